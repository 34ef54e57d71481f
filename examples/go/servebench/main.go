// Command servebench measures the example service under concurrent load on loopback: for each
// engine configuration it starts the service as a child process and runs closed-loop clients
// (each sends a request, waits for the answer, sends the next) at each concurrency, and prints
// requests/s, p50 and p99 latency, the p50 and p99 of each request's time inside the library
// (queue and pass, from the answer's Moert-Queue-Microseconds and Moert-Run-Microseconds: the
// rest is HTTP, JSON and scheduling), the mean forward-pass size the service reports, and the
// service's resident memory. Beside them, measured in the same run in this process: the
// library's own time for one forward pass of 1 row and of the row cap — the ceiling any
// service of this model reaches on this machine.
//
//	cd examples/go && go run ./servebench -model ../models/serve_bench.moert
//
// The service binary is built from ./service with `go build` (or given with -service). The
// clients run on the same machine as the service and use CPU too; the figures include that.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"moert.dev/moert"
)

type engineConfig struct {
	batch             bool
	sessions, threads int
}

func (c engineConfig) String() string {
	mode := "solo"
	if c.batch {
		mode = "batcher"
	}
	return fmt.Sprintf("%s %dx%d", mode, c.sessions, c.threads)
}

func parseConfigs(s string) ([]engineConfig, error) {
	var out []engineConfig
	for _, item := range strings.Split(s, ",") {
		mode, shape, ok := strings.Cut(strings.TrimSpace(item), ":")
		sessions, threads, ok2 := strings.Cut(shape, "x")
		if !ok || !ok2 || (mode != "solo" && mode != "batch") {
			return nil, fmt.Errorf("config %q: want solo:SESSIONSxTHREADS or batch:SESSIONSxTHREADS", item)
		}
		c := engineConfig{batch: mode == "batch"}
		var err error
		if c.sessions, err = strconv.Atoi(sessions); err != nil {
			return nil, err
		}
		if c.threads, err = strconv.Atoi(threads); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

type result struct {
	config             engineConfig
	clients            int
	requests, errors   int
	seconds            float64
	p50, p99, mean     time.Duration
	libP50, libP99     time.Duration // in the library: queue + pass, as the service reports them
	meanBatch          float64
	rssMiB, peakRSSMiB float64
}

func (r result) rps() float64 { return float64(r.requests) / r.seconds }

func main() {
	log.SetFlags(0)
	modelPath := flag.String("model", "../models/serve_bench.moert", "model file")
	servicePath := flag.String("service", "", "service binary (default: go build ./service)")
	configsFlag := flag.String("configs", "solo:1x2,solo:2x1,batch:1x2,batch:2x1", "engines: solo|batch:SESSIONSxTHREADS, comma-separated")
	clientsFlag := flag.String("clients", "1,8,64", "concurrent clients, comma-separated")
	duration := flag.Duration("duration", 10*time.Second, "measured time per point")
	warmup := flag.Duration("warmup", 2*time.Second, "unmeasured load before each point")
	rows := flag.Int("rows", 1, "rows per request")
	maxBatchRows := flag.Int("max-batch-rows", 256, "the batcher's row cap")
	maxWait := flag.Duration("max-wait", 0, "the batcher's bounded wait")
	jsonOut := flag.String("json", "", "also write the results to this file")
	svcProcs := flag.Int("service-gomaxprocs", 0, "the service's -gomaxprocs (0: its default)")
	flag.Parse()

	configs, err := parseConfigs(*configsFlag)
	if err != nil {
		log.Fatal(err)
	}
	var clientCounts []int
	for _, c := range strings.Split(*clientsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 {
			log.Fatalf("clients %q", c)
		}
		clientCounts = append(clientCounts, n)
	}
	if *servicePath == "" {
		dir, err := os.MkdirTemp("", "servebench")
		if err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(dir)
		*servicePath = filepath.Join(dir, "service")
		build := exec.Command("go", "build", "-o", *servicePath, "moert.dev/examples/service")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			log.Fatalf("go build the service: %v", err)
		}
	}

	fmt.Printf("machine: %s, %d CPUs (nproc), %s, Go %s\n", cpuModel(), runtime.NumCPU(), runtime.GOARCH, runtime.Version())
	info := modelInfo(*modelPath)
	fmt.Printf("model: %s\n", info)
	one, full := passTimes(*modelPath, *rows, *maxBatchRows, runtime.NumCPU())
	fmt.Printf("library, in this process, 1 session x %d threads: a pass of %d row(s) %.2f ms (%.0f rows/s); of %d rows %.2f ms (%.0f rows/s, the ceiling)\n",
		runtime.NumCPU(), *rows, ms(one), float64(*rows)/one.Seconds(), *maxBatchRows, ms(full),
		float64(*maxBatchRows)/full.Seconds())
	fmt.Printf("load: closed-loop clients on loopback, %d row(s) of random token ids per request, %v warm-up + %v measured per point\n\n",
		*rows, *warmup, *duration)

	var results []result
	fmt.Printf("%-14s %7s %9s %9s %9s %9s %11s %11s %10s %9s %7s\n", "engine", "clients", "req/s", "p50 ms", "p99 ms", "mean ms",
		"lib p50 ms", "lib p99 ms", "batch rows", "RSS MiB", "errors")
	for _, cfg := range configs {
		svc := startService(*servicePath, *modelPath, cfg, *maxBatchRows, *maxWait, *rows, *svcProcs)
		for _, clients := range clientCounts {
			r := measure(svc, cfg, clients, *rows, info.inWidth, info.vocab, *warmup, *duration)
			results = append(results, r)
			fmt.Printf("%-14s %7d %9.0f %9.2f %9.2f %9.2f %11.2f %11.2f %10.1f %9.1f %7d\n", cfg, clients, r.rps(),
				ms(r.p50), ms(r.p99), ms(r.mean), ms(r.libP50), ms(r.libP99), r.meanBatch, r.rssMiB, r.errors)
		}
		svc.stop()
	}
	fmt.Println()
	for _, cfg := range configs {
		var at1, atMax *result
		for i := range results {
			if results[i].config == cfg {
				if results[i].clients == clientCounts[0] {
					at1 = &results[i]
				}
				atMax = &results[i]
			}
		}
		if at1 != nil && atMax != nil && at1 != atMax {
			fmt.Printf("%-14s %d clients: %.2fx the requests/s of %d, p99 %.1f ms\n", cfg, atMax.clients,
				atMax.rps()/at1.rps(), at1.clients, ms(atMax.p99))
		}
	}
	if *jsonOut != "" {
		var rows []map[string]any
		for _, r := range results {
			rows = append(rows, map[string]any{"engine": r.config.String(), "clients": r.clients,
				"requests_per_second": r.rps(), "p50_ms": ms(r.p50), "p99_ms": ms(r.p99), "mean_ms": ms(r.mean),
				"mean_batch_rows": r.meanBatch, "rss_mib": r.rssMiB, "peak_rss_mib": r.peakRSSMiB, "errors": r.errors})
		}
		b, _ := json.MarshalIndent(map[string]any{"machine": cpuModel(), "cpus": runtime.NumCPU(),
			"pass_1_ms": ms(one), "pass_cap_ms": ms(full), "results": rows}, "", "  ")
		if err := os.WriteFile(*jsonOut, b, 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func cpuModel() string {
	f, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	var name, family, model string
	for _, line := range strings.Split(string(f), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "model name":
			name = strings.TrimSpace(v)
		case "cpu family":
			family = strings.TrimSpace(v)
		case "model":
			model = strings.TrimSpace(v)
		}
		if name != "" && family != "" && model != "" {
			break
		}
	}
	return fmt.Sprintf("%s (family %s, model %s)", name, family, model)
}

type modelSummary struct {
	name           string
	vocab, inWidth int
	params         uint64
}

func (m modelSummary) String() string {
	return fmt.Sprintf("%s, %.1f M parameters, %d token(s) per row from a vocabulary of %d", m.name,
		float64(m.params)/1e6, m.inWidth, m.vocab)
}

func modelInfo(path string) modelSummary {
	m, err := moert.LoadModel(path)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	name, _ := m.Name()
	io, _ := m.IO()
	vocab, err := m.VocabSize()
	if err != nil {
		log.Fatalf("servebench sends token ids: %v", err)
	}
	total, _, _ := m.NumParameters()
	return modelSummary{name: name, vocab: vocab, inWidth: io.InputWidth, params: total}
}

// passTimes is the median time of a forward pass of `rows` rows and of `cap` rows.
func passTimes(path string, rows, cap, threads int) (time.Duration, time.Duration) {
	m, err := moert.LoadModel(path)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	opts, _ := moert.NewSessionOptions()
	defer opts.Close()
	opts.SetThreads(threads)
	s, err := moert.NewSession(m, opts)
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	io, _ := m.IO()
	vocab, _ := m.VocabSize()
	time1 := func(n, reps int) time.Duration {
		ids := make([]int32, n*io.InputWidth)
		for i := range ids {
			ids[i] = int32(i * 37 % vocab)
		}
		var ts []time.Duration
		for i := 0; i < reps; i++ {
			start := time.Now()
			if _, err := s.ForwardTokens(ids, n); err != nil {
				log.Fatal(err)
			}
			ts = append(ts, time.Since(start))
		}
		sort.Slice(ts, func(a, b int) bool { return ts[a] < ts[b] })
		return ts[len(ts)/2]
	}
	time1(cap, 2)
	return time1(rows, 200), time1(cap, 15)
}

type service struct {
	url string
	cmd *exec.Cmd
}

func startService(path, model string, cfg engineConfig, maxBatchRows int, maxWait time.Duration, rows, gomaxprocs int) *service {
	args := []string{"-model", model, "-addr", "127.0.0.1:0", fmt.Sprintf("-batch=%v", cfg.batch),
		"-sessions", strconv.Itoa(cfg.sessions), "-threads", strconv.Itoa(cfg.threads),
		"-max-batch-rows", strconv.Itoa(maxBatchRows), "-max-wait", maxWait.String(),
		"-max-request-rows", strconv.Itoa(rows), "-max-in-flight", "1024"}
	if gomaxprocs > 0 {
		args = append(args, "-gomaxprocs", strconv.Itoa(gomaxprocs))
	}
	cmd := exec.Command(path, args...)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		log.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		log.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "listening on ") {
			go io.Copy(io.Discard, stdout)
			return &service{url: strings.TrimPrefix(line, "listening on "), cmd: cmd}
		}
	}
	log.Fatalf("the service did not start")
	return nil
}

func (s *service) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	s.cmd.Wait()
}

type metrics struct {
	Passes   int64 `json:"passes"`
	PassRows int64 `json:"pass_rows"`
}

func (s *service) metrics(client *http.Client) metrics {
	resp, err := client.Get(s.url + "/metrics")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	var m metrics
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		log.Fatal(err)
	}
	return m
}

func rss(pid int) (cur, peak float64) {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			cur = kb / 1024
		case "VmHWM:":
			peak = kb / 1024
		}
	}
	return cur, peak
}

// measure runs `clients` closed-loop clients: warm-up first, then `duration` of which every
// latency is kept.
func measure(svc *service, cfg engineConfig, clients, rows, width, vocab int, warmup, duration time.Duration) result {
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients, DisableCompression: true}}
	defer client.CloseIdleConnections()
	type sample struct {
		lat, lib []time.Duration
		err      int
	}
	samples := make([]sample, clients)
	var measuring sync.WaitGroup
	phase := make(chan struct{}) // closed when measuring starts
	stopAt := time.Now().Add(warmup + duration)
	var startMetrics metrics
	var measureStart time.Time
	for c := 0; c < clients; c++ {
		measuring.Add(1)
		go func(c int) {
			defer measuring.Done()
			rng := rand.New(rand.NewSource(int64(c)))
			var body bytes.Buffer
			for time.Now().Before(stopAt) {
				body.Reset()
				body.WriteString(`{"tokens":[`)
				for r := 0; r < rows; r++ {
					if r > 0 {
						body.WriteByte(',')
					}
					body.WriteByte('[')
					for t := 0; t < width; t++ {
						if t > 0 {
							body.WriteByte(',')
						}
						body.WriteString(strconv.Itoa(rng.Intn(vocab)))
					}
					body.WriteByte(']')
				}
				body.WriteString("]}")
				start := time.Now()
				resp, err := client.Post(svc.url+"/forward", "application/json", &body)
				ok := err == nil && resp.StatusCode == http.StatusOK
				var lib time.Duration
				if ok {
					queue, _ := strconv.Atoi(resp.Header.Get("Moert-Queue-Microseconds"))
					run, _ := strconv.Atoi(resp.Header.Get("Moert-Run-Microseconds"))
					lib = time.Duration(queue+run) * time.Microsecond
				}
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				lat := time.Since(start)
				select {
				case <-phase:
					if time.Now().Before(stopAt) {
						if ok {
							samples[c].lat = append(samples[c].lat, lat)
							samples[c].lib = append(samples[c].lib, lib)
						} else {
							samples[c].err++
						}
					}
				default:
				}
			}
		}(c)
	}
	time.Sleep(warmup)
	startMetrics = svc.metrics(http.DefaultClient)
	measureStart = time.Now()
	close(phase)
	measuring.Wait()
	elapsed := time.Since(measureStart)
	end := svc.metrics(http.DefaultClient)
	var all, lib []time.Duration
	errs := 0
	for _, s := range samples {
		all = append(all, s.lat...)
		lib = append(lib, s.lib...)
		errs += s.err
	}
	sort.Slice(lib, func(a, b int) bool { return lib[a] < lib[b] })
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	r := result{config: cfg, clients: clients, requests: len(all), errors: errs, seconds: elapsed.Seconds()}
	if len(all) > 0 {
		var sum time.Duration
		for _, l := range all {
			sum += l
		}
		r.p50, r.p99, r.mean = all[len(all)/2], all[len(all)*99/100], sum/time.Duration(len(all))
		r.libP50, r.libP99 = lib[len(lib)/2], lib[len(lib)*99/100]
	}
	if passes := end.Passes - startMetrics.Passes; passes > 0 {
		r.meanBatch = float64(end.PassRows-startMetrics.PassRows) / float64(passes)
	}
	r.rssMiB, r.peakRSSMiB = rss(svc.cmd.Process.Pid)
	return r
}

package main

import (
	"bytes"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rssBytes reads the resident set size of process pid from /proc.
func rssBytes(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// TestSoak runs many concurrent clients against the service (a child process) on loopback for
// MOERT_SOAK_SECONDS seconds: every answer is checked against a reference computed alone
// (agreeOutputs), one request in 20 is malformed and must get its 400, and the child's resident
// memory is sampled.
// It fails on any unexpected answer or transport error, on memory that keeps growing after the
// warm-up, and on goroutines left behind. Without MOERT_SOAK_SECONDS it is skipped (CTest sets it
// in example_go_soak; the README gives the figures of a long run).
func TestSoak(t *testing.T) {
	seconds, _ := strconv.Atoi(os.Getenv("MOERT_SOAK_SECONDS"))
	if seconds <= 0 {
		t.Skip("MOERT_SOAK_SECONDS is not set")
	}
	clients := 64
	if c, err := strconv.Atoi(os.Getenv("MOERT_SOAK_CLIENTS")); err == nil && c > 0 {
		clients = c
	}
	p := startProcess(t, "-model", modelPath(t), "-threads", "2", "-max-in-flight", "512")
	pid := p.cmd.Process.Pid

	const distinct = 64
	ref := referenceSession(t, modelPath(t))
	bodies := make([][]byte, distinct)
	want := make([][]float32, distinct)
	for r := range bodies {
		rows := tokenRows(r, 1+r%8)
		bodies[r] = mustJSON(map[string]any{"tokens": rows})
		want[r] = reference(t, ref, rows)
	}
	bad := []byte(`{"tokens": [[1,2,3,4],[5,6,7,99]]}`)

	idle := metricsOf(t, p.url)
	var answered, malformed, failures atomic.Int64
	var firstFailure atomic.Value
	fail := func(err error) {
		failures.Add(1)
		firstFailure.CompareAndSwap(nil, err.Error())
	}
	deadline := time.Now().Add(time.Duration(seconds) * time.Second)
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(c)))
			for time.Now().Before(deadline) {
				r := rng.Intn(distinct)
				body, isBad := bodies[r], rng.Intn(20) == 0
				if isBad {
					body = bad
				}
				resp, err := client.Post(p.url+"/forward", "application/json", bytes.NewReader(body))
				if err != nil {
					fail(err)
					continue
				}
				data := readAll(t, resp)
				if isBad {
					if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(data, []byte(`"code":"bad_token","message"`)) ||
						!bytes.Contains(data, []byte(`"row":1,"column":3`)) {
						fail(fmt.Errorf("malformed request: HTTP %d %s", resp.StatusCode, data))
					}
					malformed.Add(1)
					continue
				}
				var got forwardResponse
				if resp.StatusCode != http.StatusOK {
					fail(fmt.Errorf("HTTP %d %s", resp.StatusCode, data))
				} else if err := jsonStrict(data, &got); err != nil {
					fail(err)
				} else if err := agreeOutputs(got.Outputs, want[r], 64, aloneInPass(resp)); err != nil {
					fail(fmt.Errorf("request %d: %v", r, err))
				} else {
					answered.Add(1)
				}
			}
		}(c)
	}

	// Resident memory once a second; the warm-up is the first quarter of the run.
	var samples []int64
	for time.Now().Before(deadline) {
		time.Sleep(time.Second)
		rss, err := rssBytes(pid)
		if err != nil {
			t.Fatal(err)
		}
		samples = append(samples, rss)
	}
	wg.Wait()
	// The keep-alive connections each hold a server goroutine: close them, then count.
	client.CloseIdleConnections()
	time.Sleep(300 * time.Millisecond)
	after := metricsOf(t, p.url)

	warm := samples[len(samples)/4]
	var peak int64
	for _, s := range samples[len(samples)/4:] {
		if s > peak {
			peak = s
		}
	}
	final := samples[len(samples)-1]
	const mib = 1 << 20
	t.Logf("%d clients, %d s: %d answers checked, %d malformed requests refused, %d failures (%.0f requests/s)",
		clients, seconds, answered.Load(), malformed.Load(), failures.Load(),
		float64(answered.Load()+malformed.Load())/float64(seconds))
	t.Logf("service RSS after warm-up %.1f MiB, peak %.1f MiB, at the end %.1f MiB (growth %+.1f MiB); Go heap %.1f -> %.1f MiB; goroutines idle %d, after %d; passes %d, mean %.1f rows",
		float64(warm)/mib, float64(peak)/mib, float64(final)/mib, float64(final-warm)/mib,
		float64(idle.HeapBytes)/mib, float64(after.HeapBytes)/mib, idle.Goroutines, after.Goroutines,
		after.Passes, after.MeanBatchRows)
	if failures.Load() != 0 {
		t.Errorf("%d failures, the first: %v", failures.Load(), firstFailure.Load())
	}
	if answered.Load() == 0 || malformed.Load() == 0 {
		t.Error("no traffic was checked")
	}
	// Growth after the warm-up beyond noise (8 MiB or 10%) means something accumulates per request.
	if limit := warm + max64(8*mib, warm/10); final > limit {
		t.Errorf("resident memory grew from %d to %d bytes after the warm-up", warm, final)
	}
	if after.Goroutines > idle.Goroutines+8 {
		t.Errorf("%d goroutines after the load, %d before: goroutines leak", after.Goroutines, idle.Goroutines)
	}
	if after.InFlight != 0 || after.Failed != malformed.Load() {
		t.Errorf("metrics after the load: %+v", after)
	}
}

func metricsOf(t testing.TB, url string) Metrics {
	t.Helper()
	resp, body := get(t, url+"/metrics")
	var m Metrics
	if err := jsonStrict(body, &m); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d %s %v", resp.StatusCode, body, err)
	}
	return m
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

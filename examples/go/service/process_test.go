package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"moert.dev/moert"
)

func get(t testing.TB, url string) (*http.Response, []byte) {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	return resp, readAll(t, resp)
}

func readAll(t testing.TB, resp *http.Response) []byte {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func jsonStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytesReader(data))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// SIGTERM while requests are in flight: every one of them is answered in full, then the process
// exits 0; nothing new is accepted meanwhile.
func TestSigtermDrainsRequestsInFlight(t *testing.T) {
	// A long bounded wait keeps the requests inside the batcher when the signal arrives.
	p := startProcess(t, "-model", modelPath(t), "-threads", "1", "-max-wait", "700ms", "-max-batch-rows", "1024")
	ref := referenceSession(t, modelPath(t))
	const requests = 12
	var wg sync.WaitGroup
	errs := make(chan error, requests)
	for r := 0; r < requests; r++ {
		wg.Add(1)
		go func(r int) {
			defer wg.Done()
			rows := tokenRows(r, 3)
			resp, err := client.Post(p.url+"/forward", "application/json", bytesReader(mustJSON(map[string]any{"tokens": rows})))
			if err != nil {
				errs <- fmt.Errorf("request %d: %v", r, err)
				return
			}
			body := readAll(t, resp)
			var got forwardResponse
			if resp.StatusCode != 200 {
				errs <- fmt.Errorf("request %d: HTTP %d %s", r, resp.StatusCode, body)
			} else if err := jsonStrict(body, &got); err != nil {
				errs <- fmt.Errorf("request %d: %v", r, err)
			} else if err := agreeOutputs(got.Outputs, reference(t, ref, rows), 64, aloneInPass(resp)); err != nil {
				errs <- fmt.Errorf("request %d: %v", r, err)
			}
		}(r)
	}
	time.Sleep(250 * time.Millisecond) // the requests are queued, waiting out max-wait
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	select {
	case err := <-p.exited:
		if err != nil {
			t.Fatalf("exit: %v; stderr:\n%s", err, p.stderr)
		}
		p.exited <- nil // for the cleanup
	case <-time.After(30 * time.Second):
		t.Fatalf("the service did not exit after draining; stderr:\n%s", p.stderr)
	}
	if _, err := client.Get(p.url + "/healthz"); err == nil {
		t.Error("the service still accepts connections after it exited")
	}
	t.Logf("stderr:\n%s", p.stderr)
}

// TestCPUProfileUnderLoad takes a CPU profile of the service while it serves: Go's profiler sends
// SIGPROF to every thread, the library's GEMM threads included. Before moert blocked signals
// around oneDNN's GEMMs (moert.h, "Signals"), this aborted the service with a corrupted heap
// within seconds. Every answer must still agree with a solo call, and the service must live on.
func TestCPUProfileUnderLoad(t *testing.T) {
	// The benchmark model: GEMMs large enough to run oneDNN's generated AVX2/AVX-512 kernels.
	model := filepath.Join(filepath.Dir(modelPath(t)), "serve_bench.moert")
	p := startProcess(t, "-model", model, "-threads", "2", "-pprof", "127.0.0.1:0")
	if p.pprof == "" {
		t.Fatalf("the service did not announce its profiles; stderr:\n%s", p.stderr)
	}
	ref := referenceSession(t, model)
	loaded, err := moert.LoadModel(model)
	if err != nil {
		t.Fatal(err)
	}
	info, err := loaded.IO()
	loaded.Close()
	if err != nil {
		t.Fatal(err)
	}
	profiled := make(chan error, 1)
	go func() {
		resp, err := client.Get(p.pprof + "profile?seconds=2")
		if err == nil {
			var body []byte
			if body, err = io.ReadAll(resp.Body); err == nil && (resp.StatusCode != 200 || len(body) == 0) {
				err = fmt.Errorf("HTTP %d, %d bytes", resp.StatusCode, len(body))
			}
			resp.Body.Close()
		}
		profiled <- err
	}()
	stop := time.Now().Add(2500 * time.Millisecond)
	var wg sync.WaitGroup
	var answered atomic.Int64
	errs := make(chan error, 16)
	for c := 0; c < 16; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for r := 0; time.Now().Before(stop); r++ {
				rows := [][]int32{{int32((c*131 + r*17) % 1024)}, {int32((c*7 + r*29 + 500) % 1024)}}
				resp, err := client.Post(p.url+"/forward", "application/json", bytesReader(mustJSON(map[string]any{"tokens": rows})))
				if err != nil {
					errs <- fmt.Errorf("client %d: %v (the service died?)", c, err)
					return
				}
				body := readAll(t, resp)
				var got forwardResponse
				if resp.StatusCode != 200 {
					errs <- fmt.Errorf("client %d: HTTP %d %s", c, resp.StatusCode, body)
					return
				} else if err := jsonStrict(body, &got); err != nil {
					errs <- fmt.Errorf("client %d: %v", c, err)
					return
				} else if err := agreeOutputs(got.Outputs, reference(t, ref, rows), info.OutputWidth, aloneInPass(resp)); err != nil {
					errs <- fmt.Errorf("client %d: %v", c, err)
					return
				}
				answered.Add(1)
			}
		}(c)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := <-profiled; err != nil {
		t.Errorf("CPU profile: %v", err)
	}
	if resp, body := get(t, p.url+"/healthz"); resp.StatusCode != 200 {
		t.Errorf("healthz after profiling: HTTP %d %s", resp.StatusCode, body)
	}
	if answered.Load() == 0 {
		t.Error("no request was answered")
	}
	t.Logf("%d requests answered and checked during a 2 s CPU profile", answered.Load())
}

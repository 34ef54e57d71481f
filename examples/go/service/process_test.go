package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"
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

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"moert.dev/moert"
)

func modelPath(t *testing.T) string {
	p := os.Getenv("MOERT_TEST_MODEL")
	if p == "" {
		t.Fatal("MOERT_TEST_MODEL is not set: run through CTest, or set it to examples/models/tiny_moe.moert")
	}
	return p
}

// request r: rows windows of token ids, distinct per request.
func tokenRows(r, rows int) [][]int32 {
	out := make([][]int32, rows)
	for i := range out {
		out[i] = make([]int32, 4)
		for c := range out[i] {
			out[i][c] = int32((r*31 + i*7 + c*3) % 64)
		}
	}
	return out
}

// startService serves the example on a loopback port the system picks, until the test ends.
func startService(t *testing.T) string {
	t.Helper()
	svc, err := NewService(modelPath(t), 2)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
		svc.Close()
	})
	return "http://" + ln.Addr().String()
}

func post(client *http.Client, url string, body any) (int, []byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	resp, err := client.Post(url+"/forward", "application/json", bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp.StatusCode, data, err
}

// TestConcurrentForward fires many requests at once at one service (one shared session) and
// checks every answer against a reference computed one request at a time, in-process, by a
// session of its own.
func TestConcurrentForward(t *testing.T) {
	const requests, rows = 64, 8
	url := startService(t)

	model, err := moert.LoadModel(modelPath(t))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := moert.NewSession(model, nil)
	model.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	want := make([][]float32, requests)
	for r := range want {
		var ids []int32
		for _, row := range tokenRows(r, rows) {
			ids = append(ids, row...)
		}
		if want[r], err = ref.ForwardTokens(ids, rows); err != nil {
			t.Fatal(err)
		}
	}

	client := &http.Client{Timeout: 60 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: requests}}
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, requests)
	for r := 0; r < requests; r++ {
		wg.Add(1)
		go func(r int) {
			defer wg.Done()
			<-start
			status, body, err := post(client, url, ForwardRequest{Tokens: tokenRows(r, rows)})
			if err != nil {
				errs <- err
				return
			}
			if status != http.StatusOK {
				errs <- fmt.Errorf("request %d: HTTP %d: %s", r, status, body)
				return
			}
			var resp ForwardResponse
			if err := json.Unmarshal(body, &resp); err != nil {
				errs <- fmt.Errorf("request %d: %v", r, err)
				return
			}
			if resp.Rows != rows || resp.Width != 64 || len(resp.Outputs) != rows {
				errs <- fmt.Errorf("request %d: %d rows of width %d", r, resp.Rows, resp.Width)
				return
			}
			for i, row := range resp.Outputs {
				for j, v := range row {
					if v != want[r][i*64+j] {
						errs <- fmt.Errorf("request %d row %d col %d: %v, reference %v", r, i, j, v, want[r][i*64+j])
						return
					}
				}
			}
		}(r)
	}
	close(start)
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		failed++
		t.Error(err)
	}
	t.Logf("%d concurrent requests of %d rows, %d failed", requests, rows, failed)
}

func TestBadRequestsAreClientErrors(t *testing.T) {
	url := startService(t)
	client := &http.Client{Timeout: 30 * time.Second}
	for name, body := range map[string]any{
		"short row":    ForwardRequest{Tokens: [][]int32{{1, 2, 3}}},
		"id too large": ForwardRequest{Tokens: [][]int32{{1, 2, 3, 999}}},
		"no rows":      ForwardRequest{},
		"hidden rows":  ForwardRequest{Hidden: [][]float32{{0.5}}},
		"unknown key":  map[string]int{"tokenz": 1},
	} {
		status, data, err := post(client, url, body)
		if err != nil {
			t.Fatal(err)
		}
		if status != http.StatusBadRequest {
			t.Errorf("%s: HTTP %d: %s", name, status, data)
		}
	}
	resp, err := client.Get(url + "/model")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var info ModelInfo
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		t.Fatal(err)
	}
	if info.Name != "tiny-moe" || info.InputKind != moert.InputTokens || info.OutputWidth != 64 {
		t.Fatalf("GET /model = %+v", info)
	}
}

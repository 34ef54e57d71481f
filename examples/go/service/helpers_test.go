package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"moert.dev/moert"
)

// The test binary doubles as the service: started with MOERT_SERVICE_MAIN=1 it runs main's
// run() on its arguments, so the tests can signal a real process.
func TestMain(m *testing.M) {
	if os.Getenv("MOERT_SERVICE_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func modelPath(t testing.TB) string {
	p := os.Getenv("MOERT_TEST_MODEL")
	if p == "" {
		t.Fatal("MOERT_TEST_MODEL is not set: run through CTest, or set it to examples/models/tiny_moe.moert")
	}
	return p
}

func hiddenModelPath(t testing.TB) string {
	p := os.Getenv("MOERT_TEST_HIDDEN_MODEL")
	if p == "" {
		t.Fatal("MOERT_TEST_HIDDEN_MODEL is not set: run through CTest, or set it to examples/models/tiny_hidden.moert")
	}
	return p
}

// tokenRows is request r: rows windows of 4 token ids of the example model, distinct per r.
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

// reference computes request r alone on a session of its own.
func reference(t testing.TB, s *moert.Session, rows [][]int32) []float32 {
	var ids []int32
	for _, row := range rows {
		ids = append(ids, row...)
	}
	out, err := s.ForwardTokens(ids, len(rows))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func referenceSession(t testing.TB, path string) *moert.Session {
	model, err := moert.LoadModel(path)
	if err != nil {
		t.Fatal(err)
	}
	defer model.Close()
	s, err := moert.NewSession(model, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// startInProcess serves cfg on a loopback port the system picks, until the test ends.
func startInProcess(t testing.TB, cfg Config) (string, *Service) {
	t.Helper()
	svc, err := NewService(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
		svc.Close()
	})
	return "http://" + ln.Addr().String(), svc
}

// process is the service running as a child process.
type process struct {
	url    string
	pprof  string // the profiles' base URL, when started with -pprof
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	exited chan error
}

// startProcess runs the service binary (this test binary) with args and waits for its address.
func startProcess(t testing.TB, args ...string) *process {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"-addr", "127.0.0.1:0"}, args...)...)
	cmd.Env = append(os.Environ(), "MOERT_SERVICE_MAIN=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, stderr: &bytes.Buffer{}, exited: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	found := make(chan string, 1)
	go func() {
		for lines.Scan() {
			line := lines.Text()
			if strings.HasPrefix(line, "pprof on ") {
				p.pprof = strings.TrimPrefix(line, "pprof on ") // printed before "listening on"
			}
			if strings.HasPrefix(line, "listening on ") {
				found <- strings.TrimPrefix(line, "listening on ")
			}
		}
		close(found)
	}()
	go func() { p.exited <- cmd.Wait() }()
	select {
	case addr, ok := <-found:
		if !ok {
			t.Fatalf("the service exited before listening: %s", p.stderr)
		}
		p.url = addr
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("the service did not start: %s", p.stderr)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.exited
	})
	return p
}

var client = &http.Client{Timeout: 60 * time.Second,
	Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}}

// post sends body (marshalled unless it is a string or []byte) as application/json.
func post(t testing.TB, url string, body any) (*http.Response, []byte) {
	t.Helper()
	return postType(t, url, "application/json", body)
}

func postType(t testing.TB, url, contentType string, body any) (*http.Response, []byte) {
	t.Helper()
	var b []byte
	switch v := body.(type) {
	case string:
		b = []byte(v)
	case []byte:
		b = v
	default:
		var err error
		if b, err = json.Marshal(body); err != nil {
			t.Fatal(err)
		}
	}
	req, err := http.NewRequest(http.MethodPost, url+"/forward", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, data
}

// forwardResponse is the body of a successful POST /forward.
type forwardResponse struct {
	Rows    int         `json:"rows"`
	Width   int         `json:"width"`
	Outputs [][]float32 `json:"outputs"`
}

// errorBody decodes an error body strictly: one key "error" holding code, message and
// optionally row and column, nothing else.
type errorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Row     *int   `json:"row"`
		Column  *int   `json:"column"`
	} `json:"error"`
}

func decodeError(t testing.TB, data []byte) errorBody {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var e errorBody
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("error body %q does not have the API's shape: %v", data, err)
	}
	if e.Error.Code == "" || e.Error.Message == "" {
		t.Fatalf("error body %q lacks a code or a message", data)
	}
	return e
}

// rowTolerance bounds how far an answer that shared a forward pass may be from the same rows
// computed alone: ||got - want|| / ||want|| (L2) per row. The CPU GEMMs (oneDNN) sum a row's
// products in an order that depends on the row count of the call, so such answers differ from the
// reference in the last bits (worst row 5.4e-7 relative in the library's own tests; see
// tests/capi/batcher_test.cc and the README's serving section). A request that had its pass to
// itself (Moert-Batch-Requests 1: every request of the solo engine) ran exactly the reference's
// call and must equal it bit for bit.
const rowTolerance = 1e-5

// aloneInPass says whether the service ran the request alone (the response's batch header).
func aloneInPass(resp *http.Response) bool { return resp.Header.Get("Moert-Batch-Requests") == "1" }

// agreeOutputs checks an answer against the reference: bit for bit when alone, else each row
// within rowTolerance.
func agreeOutputs(got [][]float32, want []float32, width int, alone bool) error {
	if len(got)*width != len(want) {
		return fmt.Errorf("%d rows, want %d", len(got), len(want)/width)
	}
	for i, row := range got {
		if len(row) != width {
			return fmt.Errorf("row %d has %d values", i, len(row))
		}
		ref := want[i*width : (i+1)*width]
		var num, den float64
		for j, v := range row {
			if alone && math.Float32bits(v) != math.Float32bits(ref[j]) {
				return fmt.Errorf("row %d col %d: %v, reference %v (a pass of its own must equal it bit for bit)", i, j, v, ref[j])
			}
			d := float64(v) - float64(ref[j])
			num += d * d
			den += float64(ref[j]) * float64(ref[j])
		}
		if e := math.Sqrt(num / math.Max(den, 1e-300)); !(e <= rowTolerance) {
			return fmt.Errorf("row %d is %.3g (relative, L2) from the reference, beyond %g", i, e, rowTolerance)
		}
	}
	return nil
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

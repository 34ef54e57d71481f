package moert

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"
)

func mustBatcher(t *testing.T, m *Model, sessions, maxRows int, wait time.Duration) *Batcher {
	t.Helper()
	opts, err := NewBatcherOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer opts.Close()
	so, err := NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer so.Close()
	for _, err := range []error{so.SetThreads(1), opts.SetSessionOptions(so), opts.SetSessions(sessions),
		opts.SetMaxBatchRows(maxRows), opts.SetMaxWait(wait)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	b, err := NewBatcher(m, opts)
	if err != nil {
		t.Fatalf("NewBatcher: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// batchTolerance bounds, per row, ||batched - solo|| / ||solo|| (L2) for an answer that shared
// a pass: the CPU GEMMs (oneDNN) round a row differently in calls of different row counts (worst
// row 5.4e-7 in the C ABI's tests, tests/capi/batcher_test.cc, which say why and where a
// routing tie could exceed it). An answer whose pass carried it alone is the solo call exactly.
const batchTolerance = 1e-5

// agreesWithSolo checks a batched answer against the solo call's: bit for bit when alone in its
// pass, else each row of width within batchTolerance.
func agreesWithSolo(got, want []float32, width int, alone bool) error {
	if len(got) != len(want) {
		return fmt.Errorf("%d outputs, want %d", len(got), len(want))
	}
	for r := 0; r*width < len(want); r++ {
		var num, den float64
		for j := r * width; j < (r+1)*width; j++ {
			if alone && math.Float32bits(got[j]) != math.Float32bits(want[j]) {
				return fmt.Errorf("output %d differs from the solo call, though its pass carried it alone", j)
			}
			d := float64(got[j]) - float64(want[j])
			num += d * d
			den += float64(want[j]) * float64(want[j])
		}
		if e := math.Sqrt(num / math.Max(den, 1e-300)); !(e <= batchTolerance) {
			return fmt.Errorf("row %d is %.3g (relative, L2) from the solo call's", r, e)
		}
	}
	return nil
}

// Many goroutines at once: every answer agrees with the solo call's, requests share passes, and
// the figures add up.
func TestBatcherAnswersAgreeWithSoloCalls(t *testing.T) {
	m := mustModel(t)
	ref := mustSession(t, m, ModeInference, 1)
	b := mustBatcher(t, m, 2, 128, 5*time.Millisecond)
	const workers, perWorker = 16, 6
	want := map[int][]float32{}
	for w := 0; w < workers; w++ {
		for i := 0; i < perWorker; i++ {
			rows := 1 + (w+i)%7
			out, err := ref.ForwardTokens(batch(rows, 4, w*perWorker+i), rows)
			if err != nil {
				t.Fatal(err)
			}
			want[w*perWorker+i] = out
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	shared := 0
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < perWorker; i++ {
				rows := 1 + (w+i)%7
				got, st, err := b.ForwardTokens(batch(rows, 4, w*perWorker+i), rows)
				if err != nil {
					errs <- err
					return
				}
				if err := agreesWithSolo(got, want[w*perWorker+i], 64, st.BatchRequests == 1); err != nil {
					errs <- fmt.Errorf("worker %d request %d: %v", w, i, err)
					return
				}
				if st.BatchRows < rows || st.BatchRequests < 1 || st.Run <= 0 || st.Queue < 0 || st.Session > 1 {
					errs <- fmt.Errorf("stats %+v for %d rows", st, rows)
					return
				}
				mu.Lock()
				if st.BatchRequests > 1 {
					shared++
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	c, err := b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.Requests != workers*perWorker || c.Failed != 0 || c.Batches >= c.Requests || shared == 0 {
		t.Fatalf("counters %+v, %d requests shared a pass", c, shared)
	}
	t.Logf("%d requests in %d passes (mean %.1f rows), %d shared a pass", c.Requests, c.Batches,
		c.MeanBatchRows(), shared)
}

func TestBatcherErrorsBelongToTheirCaller(t *testing.T) {
	m := mustModel(t)
	b := mustBatcher(t, m, 1, 16, 2*time.Millisecond)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			ids := batch(2, 4, w)
			if w%2 == 1 {
				ids[5] = 64
				_, _, err := b.ForwardTokens(ids, 2)
				e := wantCode(t, err, ErrInvalidArgument)
				if want := "row 1, column 1"; !strings.Contains(e.Message, want) {
					t.Errorf("message %q does not name %q", e.Message, want)
				}
				return
			}
			if _, _, err := b.ForwardTokens(ids, 2); err != nil {
				t.Error(err)
			}
		}(w)
	}
	wg.Wait()
	_, _, err := b.ForwardTokens(batch(17, 4, 0), 17)
	wantCode(t, err, ErrInvalidArgument)
	_, _, err = b.ForwardHidden(make([]float32, 4), 1)
	wantCode(t, err, ErrInvalidArgument)
	_, _, err = b.ForwardTokens(batch(1, 4, 0), -1)
	wantCode(t, err, ErrInvalidArgument)
	c, _ := b.Counters()
	if c.Requests != 10 || c.Failed != 6 {
		t.Fatalf("counters %+v", c)
	}
}

func TestBatcherOptionsAndClose(t *testing.T) {
	m := mustModel(t)
	opts, err := NewBatcherOptions()
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, opts.SetSessions(0), ErrInvalidArgument)
	wantCode(t, opts.SetMaxBatchRows(0), ErrInvalidArgument)
	wantCode(t, opts.SetMaxBatchRows(-1), ErrInvalidArgument)
	wantCode(t, opts.SetMaxWait(2*time.Second), ErrInvalidArgument)
	wantCode(t, opts.SetMaxWait(-time.Second), ErrInvalidArgument)
	wantCode(t, opts.SetSessionOptions(nil), ErrInvalidArgument)
	so, _ := NewSessionOptions()
	so.SetMode(ModeTraining)
	if err := opts.SetSessionOptions(so); err != nil {
		t.Fatal(err)
	}
	_, err = NewBatcher(m, opts)
	wantCode(t, err, ErrInvalidArgument)
	so.Close()
	wantCode(t, opts.SetSessionOptions(so), ErrInvalidState)
	opts.Close()
	opts.Close()
	wantCode(t, opts.SetSessions(1), ErrInvalidState)

	// Close waits for the requests in flight; later calls are refused.
	b, err := NewBatcher(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				_, _, err := b.ForwardTokens(batch(4, 4, w), 4)
				var e *Error
				if err != nil && (!errors.As(err, &e) || e.Code != ErrInvalidState) {
					t.Errorf("request racing Close: %v", err)
					return
				}
			}
		}(w)
	}
	b.Close()
	wg.Wait()
	b.Close()
	_, _, err = b.ForwardTokens(batch(1, 4, 0), 1)
	wantCode(t, err, ErrInvalidState)
	_, err = b.Counters()
	wantCode(t, err, ErrInvalidState)
}

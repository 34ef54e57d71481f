package moert

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"runtime/pprof"
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
	// A negative count goes to the library as 0 rows: refused and counted like the others.
	_, _, err = b.ForwardTokens(batch(1, 4, 0), -1)
	wantCode(t, err, ErrInvalidArgument)
	c, _ := b.Counters()
	if c.Requests != 11 || c.Failed != 7 {
		t.Fatalf("counters %+v", c)
	}
	// Within the row cap but far past the input: refused before its outputs are allocated.
	_, _, err = b.ForwardTokens(batch(1, 4, 0), 1<<20)
	wantCode(t, err, ErrInvalidArgument)
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
	wantCode(t, opts.SetMaxQueuedRows(-1), ErrInvalidArgument)
	wantCode(t, opts.SetMaxQueuedRows(1<<40+1), ErrInvalidArgument)
	// A queue bound below the row cap (256) could never take a full request.
	if err := opts.SetMaxQueuedRows(8); err != nil {
		t.Fatal(err)
	}
	_, err = NewBatcher(m, opts)
	wantCode(t, err, ErrInvalidArgument)
	if err := opts.SetMaxQueuedRows(0); err != nil {
		t.Fatal(err)
	}
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

// waitPending waits for p at most limit: a Pending that never gets its answer fails the test
// instead of hanging it.
func waitPending(t *testing.T, p *Pending, limit time.Duration) ([]float32, RequestStats, error) {
	t.Helper()
	select {
	case <-p.Done():
		return p.Wait()
	case <-time.After(limit):
		t.Fatalf("no answer after %v", limit)
		return nil, RequestStats{}, nil
	}
}

// checkStats checks the figures of a successful request of rows rows on a batcher of sessions
// sessions.
func checkStats(st RequestStats, rows, sessions int) error {
	if st.BatchRows < rows || st.BatchRequests < 1 || st.BatchRequests > st.BatchRows ||
		st.Run <= 0 || st.Queue < 0 || st.Session < 0 || st.Session >= sessions {
		return fmt.Errorf("stats %+v for %d rows on %d sessions", st, rows, sessions)
	}
	return nil
}

// Submitted requests of tokens and of hidden states get the solo call's answers (bit for bit
// when alone in their pass), whether waited on through Wait or Done; submitted and blocking
// requests share passes.
func TestBatcherSubmitAgreesWithSoloCalls(t *testing.T) {
	m := mustModel(t)
	ref := mustSession(t, m, ModeInference, 1)
	b := mustBatcher(t, m, 2, 64, 5*time.Millisecond)
	const requests = 48
	want := make([][]float32, requests)
	for i := range want {
		rows := 1 + i%5
		out, err := ref.ForwardTokens(batch(rows, 4, i), rows)
		if err != nil {
			t.Fatal(err)
		}
		want[i] = out
	}
	pending := make([]*Pending, requests)
	for i := range pending {
		rows := 1 + i%5
		ids := batch(rows, 4, i)
		p, err := b.SubmitTokens(ids, rows)
		if err != nil {
			t.Fatal(err)
		}
		for j := range ids {
			ids[j] = -1 // the library copied them: reuse does not change the request
		}
		pending[i] = p
	}
	// A blocking call among them.
	got, st, err := b.ForwardTokens(batch(3, 4, 2), 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := agreesWithSolo(got, want[2], 64, st.BatchRequests == 1); err != nil {
		t.Fatalf("blocking call: %v", err)
	}
	shared := 0
	for i, p := range pending {
		got, st, err := waitPending(t, p, 30*time.Second)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if err := agreesWithSolo(got, want[i], 64, st.BatchRequests == 1); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if err := checkStats(st, 1+i%5, 2); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if st.BatchRequests > 1 {
			shared++
		}
		// Wait again: the same answer.
		again, st2, err2 := p.Wait()
		if err2 != nil || &again[0] != &got[0] || st2 != st {
			t.Fatalf("request %d: a second Wait gave another answer", i)
		}
	}
	c, err := b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.Requests != requests+1 || c.Failed != 0 || c.Batches >= c.Requests || shared == 0 {
		t.Fatalf("counters %+v, %d requests shared a pass", c, shared)
	}
	t.Logf("%d requests in %d passes (mean %.1f rows), %d shared a pass", c.Requests, c.Batches,
		c.MeanBatchRows(), shared)

	// Hidden states.
	hm := mustHiddenModel(t)
	href := mustSession(t, hm, ModeInference, 1)
	hb := mustBatcher(t, hm, 1, 64, 5*time.Millisecond)
	const hrequests = 16
	hwant := make([][]float32, hrequests)
	hpending := make([]*Pending, hrequests)
	for i := range hpending {
		rows := 1 + i%3
		in := make([]float32, rows*5)
		for j := range in {
			in[j] = float32((j*7+i*3)%11)/5 - 1
		}
		if hwant[i], err = href.ForwardHidden(in, rows); err != nil {
			t.Fatal(err)
		}
		if hpending[i], err = hb.SubmitHidden(in, rows); err != nil {
			t.Fatal(err)
		}
	}
	for i, p := range hpending {
		got, st, err := waitPending(t, p, 30*time.Second)
		if err != nil {
			t.Fatalf("hidden request %d: %v", i, err)
		}
		if err := agreesWithSolo(got, hwant[i], hb.IO().OutputWidth, st.BatchRequests == 1); err != nil {
			t.Fatalf("hidden request %d: %v", i, err)
		}
		if err := checkStats(st, 1+i%3, 1); err != nil {
			t.Fatalf("hidden request %d: %v", i, err)
		}
	}
}

// 200 goroutines submit at once under GOMAXPROCS 2: every answer is right, and waiting holds no
// OS thread per request (a blocking ForwardTokens holds one each while its goroutine is in C).
func TestBatcherSubmitFromManyGoroutines(t *testing.T) {
	m := mustModel(t)
	ref := mustSession(t, m, ModeInference, 1)
	b := mustBatcher(t, m, 2, 128, 2*time.Millisecond)
	const goroutines = 200
	want := make([][]float32, goroutines)
	for g := range want {
		rows := 1 + g%4
		out, err := ref.ForwardTokens(batch(rows, 4, g), rows)
		if err != nil {
			t.Fatal(err)
		}
		want[g] = out
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	threads := pprof.Lookup("threadcreate")
	before := threads.Count()
	start := make(chan struct{})
	errs := make(chan error, goroutines)
	var wg sync.WaitGroup
	var mu sync.Mutex
	shared := 0
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rows := 1 + g%4
			<-start
			p, err := b.SubmitTokens(batch(rows, 4, g), rows)
			if err != nil {
				errs <- err
				return
			}
			var got []float32
			var st RequestStats
			select {
			case <-p.Done():
				got, st, err = p.Wait()
			case <-time.After(30 * time.Second):
				err = fmt.Errorf("goroutine %d: no answer after 30 s", g)
			}
			if err == nil {
				err = agreesWithSolo(got, want[g], 64, st.BatchRequests == 1)
			}
			if err == nil {
				err = checkStats(st, rows, 2)
			}
			if err != nil {
				errs <- fmt.Errorf("goroutine %d: %v", g, err)
				return
			}
			mu.Lock()
			if st.BatchRequests > 1 {
				shared++
			}
			mu.Unlock()
		}(g)
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	created := threads.Count() - before
	c, err := b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d requests in %d passes (mean %.1f rows), %d shared a pass; %d OS threads created",
		c.Requests, c.Batches, c.MeanBatchRows(), shared, created)
	if c.Requests != goroutines || c.Failed != 0 || shared == 0 {
		t.Fatalf("counters %+v, %d requests shared a pass", c, shared)
	}
	if created >= goroutines/4 {
		t.Fatalf("%d OS threads were created for %d requests in flight", created, goroutines)
	}
}

// A request the library refuses fails at submit with the blocking call's error and is never
// answered (its callback, called, would find its handle deleted and panic); nothing is queued.
func TestBatcherSubmitRefusesBadRequests(t *testing.T) {
	m := mustModel(t)
	b := mustBatcher(t, m, 1, 16, 0)
	ids := batch(2, 4, 1)
	ids[5] = 64
	p, err := b.SubmitTokens(ids, 2)
	e := wantCode(t, err, ErrInvalidArgument)
	if want := "row 1, column 1"; !strings.Contains(e.Message, want) || p != nil {
		t.Fatalf("message %q does not name %q, or a Pending came back", e.Message, want)
	}
	refused := []func() (*Pending, error){
		func() (*Pending, error) { return b.SubmitTokens(batch(17, 4, 0), 17) },    // over the row cap
		func() (*Pending, error) { return b.SubmitTokens(batch(2, 4, 0), 3) },      // too few ids
		func() (*Pending, error) { return b.SubmitTokens(batch(1, 4, 0), 0) },      // no rows
		func() (*Pending, error) { return b.SubmitTokens(nil, 1) },                 // no ids
		func() (*Pending, error) { return b.SubmitHidden(make([]float32, 4), 1) },  // tokens model
		func() (*Pending, error) { return b.SubmitTokens(batch(1, 4, 0), -1) },     // goes as 0 rows
		func() (*Pending, error) { return b.SubmitHidden(make([]float32, 4), -1) }, // goes as 0 rows
	}
	for i, f := range refused {
		p, err := f()
		wantCode(t, err, ErrInvalidArgument)
		if p != nil {
			t.Fatalf("refused request %d came with a Pending", i)
		}
	}
	// The library counted the eight as failed requests; a good one is still answered.
	p, err = b.SubmitTokens(batch(1, 4, 0), 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, st, err := waitPending(t, p, 30*time.Second); err != nil || checkStats(st, 1, 1) != nil {
		t.Fatalf("good request after refused ones: %v %+v", err, st)
	}
	c, err := b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.Requests != 9 || c.Failed != 8 || c.Batches != 1 {
		t.Fatalf("counters %+v", c)
	}
}

// Close with submitted requests in flight: every Pending is answered by the time Close returns,
// with its right answer (its pass had begun) or ErrInvalidState (it was still queued); later
// submissions are refused.
func TestBatcherCloseAnswersEveryPending(t *testing.T) {
	m := mustModel(t)
	ref := mustSession(t, m, ModeInference, 1)

	// Requests waiting for a fuller pass (the wait is 1 s) are still queued when Close comes.
	b := mustBatcher(t, m, 1, 256, time.Second)
	var queued []*Pending
	for i := 0; i < 3; i++ {
		p, err := b.SubmitTokens(batch(1, 4, i), 1)
		if err != nil {
			t.Fatal(err)
		}
		queued = append(queued, p)
	}
	closed := make(chan struct{})
	go func() { b.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return")
	}
	for i, p := range queued {
		select {
		case <-p.Done():
		default:
			t.Fatalf("queued request %d has no answer after Close", i)
		}
		out, _, err := p.Wait()
		wantCode(t, err, ErrInvalidState)
		if out != nil {
			t.Fatalf("queued request %d: outputs with an error", i)
		}
	}
	_, err := b.SubmitTokens(batch(1, 4, 0), 1)
	wantCode(t, err, ErrInvalidState)

	// Full passes back to back (cap 4 rows, one session), Close in the middle of them, and
	// goroutines submitting while Close runs.
	b = mustBatcher(t, m, 1, 4, time.Second)
	const requests = 300
	want := make([][]float32, 8)
	for i := range want {
		out, err := ref.ForwardTokens(batch(4, 4, i), 4)
		if err != nil {
			t.Fatal(err)
		}
		want[i] = out
	}
	type submitted struct {
		p    *Pending
		seed int
	}
	var all []submitted
	for i := 0; i < requests; i++ {
		p, err := b.SubmitTokens(batch(4, 4, i%8), 4)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, submitted{p, i % 8})
	}
	var wg, started sync.WaitGroup
	var mu sync.Mutex
	for w := 0; w < 4; w++ {
		wg.Add(1)
		started.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				p, err := b.SubmitTokens(batch(4, 4, w), 4)
				if err != nil {
					// Only after Close.
					if e := (*Error)(nil); !errors.As(err, &e) || e.Code != ErrInvalidState {
						t.Errorf("submitting while Close runs: %v", err)
					}
					if i == 0 {
						started.Done()
					}
					return
				}
				mu.Lock()
				all = append(all, submitted{p, w})
				mu.Unlock()
				if i == 0 {
					started.Done()
				}
			}
		}(w)
	}
	started.Wait()
	closed = make(chan struct{})
	go func() { b.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return")
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	answered, failed := 0, 0
	for i, s := range all {
		out, st, err := waitPending(t, s.p, 30*time.Second)
		if err != nil {
			wantCode(t, err, ErrInvalidState)
			failed++
			continue
		}
		if err := agreesWithSolo(out, want[s.seed], 64, st.BatchRequests == 1); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		answered++
	}
	t.Logf("Close with %d requests in flight: %d answered, %d refused as queued", len(all),
		answered, failed)
	if failed == 0 {
		t.Log("every request's pass had begun before Close (a fast machine)")
	}
}

// A Pending waited on from many goroutines at once: every one gets the same answer; Close from
// several goroutines at once while others wait returns in each, and answers every Pending.
func TestBatcherPendingManyWaitersAndConcurrentCloses(t *testing.T) {
	m := mustModel(t)
	ref := mustSession(t, m, ModeInference, 1)
	b := mustBatcher(t, m, 2, 64, time.Millisecond)
	p, err := b.SubmitTokens(batch(3, 4, 5), 3)
	if err != nil {
		t.Fatal(err)
	}
	want, err := ref.ForwardTokens(batch(3, 4, 5), 3)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, st, err := p.Wait()
			if err == nil {
				err = agreesWithSolo(out, want, 64, st.BatchRequests == 1)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}

	// Requests held in the queue (1 s wait, a cap they never fill), goroutines waiting on each,
	// and four Closes at once.
	b2 := mustBatcher(t, m, 1, 1024, time.Second)
	var pendings []*Pending
	for i := 0; i < 8; i++ {
		p, err := b2.SubmitTokens(batch(1, 4, i), 1)
		if err != nil {
			t.Fatal(err)
		}
		pendings = append(pendings, p)
	}
	waited := make(chan error, len(pendings))
	for _, p := range pendings {
		go func(p *Pending) { _, _, err := p.Wait(); waited <- err }(p)
	}
	closes := make(chan struct{}, 4)
	for c := 0; c < 4; c++ {
		go func() { b2.Close(); closes <- struct{}{} }()
	}
	deadline := time.After(30 * time.Second)
	for c := 0; c < 4; c++ {
		select {
		case <-closes:
		case <-deadline:
			t.Fatal("a concurrent Close did not return")
		}
	}
	for range pendings {
		select {
		case err := <-waited:
			wantCode(t, err, ErrInvalidState)
		case <-deadline:
			t.Fatal("a goroutine waiting on a Pending was not answered after Close")
		}
	}
}

// A Pending keeps its Batcher from being finalized: a program that drops its last reference to
// the Batcher (fire and forget) still gets its request answered by a pass, not by the finalizer's
// Close; once answered, the Batcher is finalized (closed) by the collector.
func TestBatcherPendingKeepsTheBatcherFromItsFinalizer(t *testing.T) {
	m := mustModel(t)
	ref := mustSession(t, m, ModeInference, 1)
	want, err := ref.ForwardTokens(batch(2, 4, 3), 2)
	if err != nil {
		t.Fatal(err)
	}
	opts, err := NewBatcherOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer opts.Close()
	if err := opts.SetMaxBatchRows(1024); err != nil {
		t.Fatal(err)
	}
	if err := opts.SetMaxWait(300 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	p := func() *Pending {
		b, err := NewBatcher(m, opts)
		if err != nil {
			t.Fatal(err)
		}
		p, err := b.SubmitTokens(batch(2, 4, 3), 2)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}()
	for i := 0; i < 3; i++ {
		runtime.GC()
	}
	out, st, err := waitPending(t, p, 30*time.Second)
	if err != nil {
		t.Fatalf("the request of an unreferenced batcher was not served: %v", err)
	}
	if err := agreesWithSolo(out, want, 64, st.BatchRequests == 1); err != nil {
		t.Fatal(err)
	}
}

// Hidden-state submissions: a NaN or an infinity is refused at submit with ErrNumeric (the
// session option check_finite is on by default), never answered; a good one is answered.
func TestBatcherSubmitHiddenRefusesNonFiniteInput(t *testing.T) {
	m := mustHiddenModel(t)
	b := mustBatcher(t, m, 1, 16, 0)
	w := b.IO().InputWidth
	for _, v := range []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))} {
		in := make([]float32, 2*w)
		in[w+1] = v
		p, err := b.SubmitHidden(in, 2)
		wantCode(t, err, ErrNumeric)
		if p != nil {
			t.Fatal("a refused request came with a Pending")
		}
	}
	_, err := b.SubmitTokens(batch(1, w, 0), 1)
	wantCode(t, err, ErrInvalidArgument)
	p, err := b.SubmitHidden(make([]float32, 2*w), 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := waitPending(t, p, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	c, err := b.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if c.Requests != 5 || c.Failed != 4 {
		t.Fatalf("counters %+v: want 5 requests, 4 failed (the refused ones)", c)
	}
}

// rows*OutputWidth overflowing int: the blocking calls refuse the request (rows above the row cap)
// with ErrInvalidArgument, as the submitting ones do, rather than panic in make.
func TestBatcherRowsWhoseOutputSizeOverflowsAreRefused(t *testing.T) {
	m := mustModel(t)
	b := mustBatcher(t, m, 1, 16, 0)
	rows := 1 << 57 // * 64 outputs = 2^63: negative as an int
	for name, call := range map[string]func() error{
		"SubmitTokens": func() error { _, err := b.SubmitTokens(batch(1, 4, 0), rows); return err },
		"ForwardTokens": func() error {
			_, _, err := b.ForwardTokens(batch(1, 4, 0), rows)
			return err
		},
	} {
		var err error
		func() {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("panicked: %v", r)
				}
			}()
			err = call()
		}()
		if e := (*Error)(nil); !errors.As(err, &e) || e.Code != ErrInvalidArgument {
			t.Errorf("%s with %d rows: %v, want ErrInvalidArgument", name, rows, err)
		}
	}
}

package moert

import (
	"fmt"
	"runtime"
	"runtime/cgo"
	"time"

	"moert.dev/moert/internal/capi"
)

// BatcherOptions configures NewBatcher. Defaults: 1 session, at most 256 rows per forward pass,
// no wait, default session options. It must not be modified from two goroutines at once.
type BatcherOptions struct {
	g   guard
	ptr capi.Struct_SS_moert_batcher_options
}

// NewBatcherOptions creates batcher options with the defaults.
func NewBatcherOptions() (*BatcherOptions, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	var p uintptr
	if err := check(capi.Moert_batcher_options_create(&p)); err != nil {
		return nil, err
	}
	o := &BatcherOptions{g: guard{what: "batcher options"},
		ptr: capi.SwigcptrStruct_SS_moert_batcher_options(p)}
	runtime.SetFinalizer(o, (*BatcherOptions).Close)
	return o, nil
}

// Close releases the options; a second Close does nothing.
func (o *BatcherOptions) Close() error {
	if o == nil {
		return nil
	}
	o.g.close(func() {
		capi.Moert_batcher_options_free(o.ptr)
		runtime.SetFinalizer(o, nil)
	})
	return nil
}

func (o *BatcherOptions) set(call func() capi.Struct_SS_moert_status) error {
	if err := o.g.enter(); err != nil {
		return err
	}
	defer o.g.leave()
	return check(call())
}

// SetSessions sets the number of inference sessions in the pool, 1 to 256: how many forward
// passes run at once. Sessions x threads per session should be about the machine's cores.
func (o *BatcherOptions) SetSessions(sessions int) error {
	n, err := index32("sessions", sessions)
	if err != nil {
		return err
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_options_set_sessions(o.ptr, n)
	})
}

// SetMaxBatchRows sets the row cap, 1 to 2^20: the most rows one pass gathers and the most rows
// one request may have.
func (o *BatcherOptions) SetMaxBatchRows(rows int) error {
	if rows < 0 {
		return &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf("max batch rows %d is negative", rows)}
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_options_set_max_batch_rows(o.ptr, uint64(rows))
	})
}

// SetMaxQueuedRows bounds the rows waiting for a pass, 0 (the default: no bound) to 2^40, and at
// least the row cap when not 0: a request that would queue more fails at once with ErrLimit, so
// that a service under overload sheds load instead of queueing without end.
func (o *BatcherOptions) SetMaxQueuedRows(rows int) error {
	if rows < 0 {
		return &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf("max queued rows %d is negative", rows)}
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_options_set_max_queued_rows(o.ptr, uint64(rows))
	})
}

// SetMaxWait sets the bounded wait, 0 to 1 s (microsecond resolution): how long a free session
// holding fewer rows than the cap waits for more after the oldest queued request arrived.
func (o *BatcherOptions) SetMaxWait(wait time.Duration) error {
	if wait < 0 {
		return &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf("max wait %v is negative", wait)}
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_options_set_max_wait_us(o.ptr, uint64(wait/time.Microsecond))
	})
}

// SetSessionOptions sets the options every pool session is created with (copied). Training mode
// is refused by NewBatcher.
func (o *BatcherOptions) SetSessionOptions(opts *SessionOptions) error {
	if opts == nil {
		return &Error{Code: ErrInvalidArgument, Message: "session options are nil"}
	}
	if err := opts.g.enter(); err != nil {
		return err
	}
	defer opts.g.leave()
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_options_set_session_options(o.ptr, opts.ptr)
	})
}

// RequestStats describes how one request was served.
type RequestStats struct {
	Queue         time.Duration // from entering the batcher to the start of its forward pass
	Run           time.Duration // the forward pass that carried it
	BatchRows     int           // rows of that pass
	BatchRequests int           // requests of that pass
	Session       int           // pool index of the session that ran it
}

// BatcherCounters are a batcher's cumulative figures since its creation.
type BatcherCounters struct {
	Requests int64         // requests answered, failed ones included
	Failed   int64         // requests answered with an error
	Batches  int64         // forward passes run for batches
	Rows     int64         // rows of those passes
	Queue    time.Duration // sum of the answered requests' queue times
	Run      time.Duration // sum of the passes' run times
	Isolated int64         // batches that failed and were rerun request by request
}

// MeanBatchRows is Rows / Batches (0 before the first pass).
func (c BatcherCounters) MeanBatchRows() float64 {
	if c.Batches == 0 {
		return 0
	}
	return float64(c.Rows) / float64(c.Batches)
}

// Batcher serves inference to many goroutines at once: each call blocks while the batcher
// gathers the calls that arrive within the bounded wait, up to the row cap, into one forward pass
// on a pool of sessions over the model, and returns exactly the caller's own outputs and error —
// the outputs a Session would return for those rows alone (within 1e-5 relative per row on the
// CPU, bit for bit when the pass carried the request alone; see moert.h and the README). One
// caller's bad input fails that caller alone.
//
// A request is either blocking (ForwardTokens, ForwardHidden and their Into forms) or submitted
// (SubmitTokens, SubmitHidden, which return a *Pending at once). Both kinds share the same queue
// and passes and get the same answers.
//
// A blocking call waits inside C for its pass, and Go counts a goroutine in a C call against
// GOMAXPROCS until the runtime's monitor hands its P to another goroutine, which can take up to
// about 10 ms; each one also holds an OS thread for the whole request. A server whose handlers
// make blocking calls should therefore run with GOMAXPROCS well above the core count, or the
// goroutines waiting in C hold the Ps its other goroutines need to read the next requests. A
// goroutine waiting on a Pending is parked on a channel instead and holds neither a P nor a
// thread, so a server that submits needs no such setting (examples/go/service does so).
type Batcher struct {
	g   guard
	ptr capi.Struct_SS_moert_batcher
	io  IO
}

// NewBatcher creates a batcher over model with opts (nil: defaults) and starts its sessions.
// The batcher keeps what it needs of the model, which may be closed afterwards.
func NewBatcher(model *Model, opts *BatcherOptions) (*Batcher, error) {
	if model == nil {
		return nil, &Error{Code: ErrInvalidArgument, Message: "model is nil"}
	}
	if abiErr != nil {
		return nil, abiErr
	}
	io, err := model.IO()
	if err != nil {
		return nil, err
	}
	if err := model.g.enter(); err != nil {
		return nil, err
	}
	defer model.g.leave()
	var optsPtr capi.Struct_SS_moert_batcher_options = capi.SwigcptrStruct_SS_moert_batcher_options(0)
	if opts != nil {
		if err := opts.g.enter(); err != nil {
			return nil, err
		}
		defer opts.g.leave()
		optsPtr = opts.ptr
	}
	var p uintptr
	if err := check(capi.Moert_batcher_create(model.ptr, optsPtr, &p)); err != nil {
		return nil, err
	}
	b := &Batcher{g: guard{what: "batcher"}, ptr: capi.SwigcptrStruct_SS_moert_batcher(p), io: io}
	runtime.SetFinalizer(b, (*Batcher).Close)
	return b, nil
}

// Close waits for the blocking calls in flight, then stops the sessions and releases the batcher;
// a second Close does nothing, and later calls return ErrInvalidState. Submitted requests do not
// hold Close back: those in a forward pass finish and are answered, and those still queued are
// answered with ErrInvalidState; by the time Close returns every Pending of the batcher has its
// answer (Done is closed). Other goroutines may be waiting on Pendings meanwhile.
func (b *Batcher) Close() error {
	if b == nil {
		return nil
	}
	b.g.close(func() {
		capi.Moert_batcher_free(b.ptr)
		runtime.SetFinalizer(b, nil)
	})
	return nil
}

// IO is what a request takes and returns.
func (b *Batcher) IO() IO { return b.io }

func (b *Batcher) call(f func() capi.Struct_SS_moert_status) error {
	if err := b.g.enter(); err != nil {
		return err
	}
	defer b.g.leave()
	return check(f())
}

func requestStats(s []int64) RequestStats {
	return RequestStats{
		Queue:         time.Duration(s[capi.MOERT_REQUEST_QUEUE_NS]),
		Run:           time.Duration(s[capi.MOERT_REQUEST_RUN_NS]),
		BatchRows:     int(s[capi.MOERT_REQUEST_BATCH_ROWS]),
		BatchRequests: int(s[capi.MOERT_REQUEST_BATCH_REQUESTS]),
		Session:       int(s[capi.MOERT_REQUEST_SESSION]),
	}
}

// ForwardTokens is one request of rows rows of token ids (tokens holds rows*InputWidth ids,
// row-major); it returns rows*OutputWidth outputs and how the request was served.
func (b *Batcher) ForwardTokens(tokens []int32, rows int) ([]float32, RequestStats, error) {
	out := b.io.outputs(rows, len(tokens))
	in, stats := ownInts(tokens), make([]int64, capi.MOERT_REQUEST_STATS)
	if err := b.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_forward_tokens(b.ptr, in, forwardRows(rows), out, stats)
	}); err != nil {
		return nil, RequestStats{}, err
	}
	return out, requestStats(stats), nil
}

// ForwardTokensInto is ForwardTokens writing into out (rows*OutputWidth values), written only on
// success. tokens and out may lie in any Go memory.
func (b *Batcher) ForwardTokensInto(tokens []int32, rows int, out []float32) (RequestStats, error) {
	in, dst, stats := ownInts(tokens), scratchFloats(out), make([]int64, capi.MOERT_REQUEST_STATS)
	if err := b.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_forward_tokens(b.ptr, in, forwardRows(rows), dst, stats)
	}); err != nil {
		return RequestStats{}, err
	}
	copy(out, dst)
	return requestStats(stats), nil
}

// ForwardHidden is one request of rows rows of hidden states (in holds rows*InputWidth values);
// it returns rows*OutputWidth outputs and how the request was served.
func (b *Batcher) ForwardHidden(in []float32, rows int) ([]float32, RequestStats, error) {
	out := b.io.outputs(rows, len(in))
	src, stats := ownFloats(in), make([]int64, capi.MOERT_REQUEST_STATS)
	if err := b.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_forward_hidden(b.ptr, src, forwardRows(rows), out, stats)
	}); err != nil {
		return nil, RequestStats{}, err
	}
	return out, requestStats(stats), nil
}

// ForwardHiddenInto is ForwardHidden writing into out, written only on success. in and out may
// lie in any Go memory.
func (b *Batcher) ForwardHiddenInto(in []float32, rows int, out []float32) (RequestStats, error) {
	src, dst, stats := ownFloats(in), scratchFloats(out), make([]int64, capi.MOERT_REQUEST_STATS)
	if err := b.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_forward_hidden(b.ptr, src, forwardRows(rows), dst, stats)
	}); err != nil {
		return RequestStats{}, err
	}
	copy(out, dst)
	return requestStats(stats), nil
}

// Pending is a request submitted with SubmitTokens or SubmitHidden: its answer arrives once,
// when the forward pass that carried it is over. Done is closed then, and Wait returns it. A
// Pending may be waited on from any number of goroutines, and is always answered: a request
// still queued when its Batcher is closed fails with ErrInvalidState.
type Pending struct {
	done    chan struct{}
	batcher *Batcher // keeps the Batcher reachable (its finalizer closes it) until answered
	out     []float32
	stats   RequestStats
	err     error
}

// Done is closed when the answer has arrived; then Wait returns at once. Select on it with a
// context to stop waiting: the answer, when it comes, is then dropped.
func (p *Pending) Done() <-chan struct{} { return p.done }

// Wait waits for the answer and returns what ForwardTokens or ForwardHidden would have: the
// request's rows*OutputWidth outputs (the same slice to every caller: copy it before changing
// it if others may read it) and how it was served, or its error.
func (p *Pending) Wait() ([]float32, RequestStats, error) {
	<-p.done
	if p.err != nil {
		return nil, RequestStats{}, p.err
	}
	return p.out, p.stats, nil
}

// submit queues a request through call (one of the capi submit functions, given the callback
// and its user data) and returns its Pending. The Pending travels to C as a cgo.Handle, which
// the callback deletes; C keeps no Go pointer. A refused request is never answered, so its
// handle is deleted here.
func (b *Batcher) submit(call func(done *byte, userData uintptr) capi.Struct_SS_moert_status) (*Pending, error) {
	p := &Pending{done: make(chan struct{}), batcher: b}
	h := cgo.NewHandle(p)
	if err := b.call(func() capi.Struct_SS_moert_status {
		return call(batcherCallback(), uintptr(h))
	}); err != nil {
		h.Delete()
		return nil, err
	}
	return p, nil
}

// SubmitTokens submits one request of rows rows of token ids (tokens holds rows*InputWidth ids,
// row-major) without waiting for it, and returns its Pending. It is validated before it is
// queued: a request ForwardTokens would refuse (its shape, an id outside the vocabulary, a
// closed batcher) is refused here with the same error, no Pending is returned and nothing is
// answered later. tokens may be reused as soon as SubmitTokens returns. Submitted requests
// share the queue and the passes of the blocking calls.
//
// Unlike ForwardTokens, no goroutine and no OS thread waits in C for the pass: the library's
// thread that finishes the pass hands the answer over, and a goroutine waiting on the Pending is
// parked like one waiting on any channel. A server can hold thousands of requests in flight
// without raising GOMAXPROCS. The hand-over is a short Go function run on the library's thread
// (copy the outputs, close Done), which needs one of the program's Ps for that moment; the
// session that ran the pass starts its next one when it returns.
func (b *Batcher) SubmitTokens(tokens []int32, rows int) (*Pending, error) {
	in := ownInts(tokens)
	return b.submit(func(done *byte, userData uintptr) capi.Struct_SS_moert_status {
		return capi.Moert_batcher_submit_tokens(b.ptr, in, forwardRows(rows), done, userData)
	})
}

// SubmitHidden is SubmitTokens over rows rows of hidden states (in holds rows*InputWidth
// values), validated and answered as ForwardHidden would be (a non-finite value is refused
// with ErrNumeric under the session option "check_finite", on by default). in may be reused as
// soon as it returns.
func (b *Batcher) SubmitHidden(in []float32, rows int) (*Pending, error) {
	src := ownFloats(in)
	return b.submit(func(done *byte, userData uintptr) capi.Struct_SS_moert_status {
		return capi.Moert_batcher_submit_hidden(b.ptr, src, forwardRows(rows), done, userData)
	})
}

// Counters reads the batcher's cumulative figures (a consistent snapshot).
func (b *Batcher) Counters() (BatcherCounters, error) {
	c := make([]int64, capi.MOERT_BATCHER_COUNTERS)
	if err := b.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_batcher_counters(b.ptr, c)
	}); err != nil {
		return BatcherCounters{}, err
	}
	return BatcherCounters{
		Requests: c[capi.MOERT_BATCHER_REQUESTS],
		Failed:   c[capi.MOERT_BATCHER_FAILED],
		Batches:  c[capi.MOERT_BATCHER_BATCHES],
		Rows:     c[capi.MOERT_BATCHER_ROWS],
		Queue:    time.Duration(c[capi.MOERT_BATCHER_QUEUE_NS]),
		Run:      time.Duration(c[capi.MOERT_BATCHER_RUN_NS]),
		Isolated: c[capi.MOERT_BATCHER_ISOLATED],
	}, nil
}

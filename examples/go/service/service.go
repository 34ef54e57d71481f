package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"sync/atomic"
	"time"

	"moert.dev/moert"
)

// Config is what the service is started with; DefaultConfig gives the flags' defaults.
type Config struct {
	ModelPath      string
	Batch          bool          // a moert.Batcher; false: a pool of sessions, one request per pass
	Sessions       int           // inference sessions: passes that run at once
	Threads        int           // threads per session
	MaxBatchRows   int           // rows one pass gathers at most (batcher)
	MaxWait        time.Duration // how long a free session waits for more rows (batcher)
	MaxRequestRows int           // rows one request may have
	MaxInFlight    int           // requests served at once
	RequestTimeout time.Duration // how long a request may wait for its answer (0: no limit)
}

// DefaultConfig: one session using every core, batches of up to 256 rows, requests of up to 64
// rows, 256 requests in flight.
func DefaultConfig() Config {
	return Config{Batch: true, Sessions: 1, Threads: runtime.NumCPU(), MaxBatchRows: 256,
		MaxWait: 0, MaxRequestRows: 64, MaxInFlight: 256}
}

// ModelInfo is what GET /model answers.
type ModelInfo struct {
	Name        string `json:"name"`
	InputKind   string `json:"input_kind"` // "tokens" or "hidden"
	InputWidth  int    `json:"input_width"`
	OutputWidth int    `json:"output_width"`
	VocabSize   int    `json:"vocab_size,omitempty"` // token models: ids are 0 to vocab_size-1
	Layers      int    `json:"layers"`
	Parameters  uint64 `json:"parameters"`
	MaxRows     int    `json:"max_request_rows"`
	BodyLimit   int64  `json:"body_limit_bytes"`
}

// engine runs one request's rows: through the batcher, or alone on a pool session. When ctx is
// done first it returns ctx's error; what the library still computes for the request is dropped.
type engine interface {
	forwardTokens(ctx context.Context, ids []int32, rows int) ([]float32, moert.RequestStats, error)
	forwardHidden(ctx context.Context, in []float32, rows int) ([]float32, moert.RequestStats, error)
	counters() moert.BatcherCounters
	close()
}

// Service answers the HTTP API for one model.
type Service struct {
	cfg       Config
	info      ModelInfo
	engine    engine
	bodyLimit int64
	slots     chan struct{} // one per request in flight
	draining  atomic.Bool

	requests, failed, rejected, abandoned atomic.Int64
}

// Bytes one value may take in a request body: the longest int32 ("-2147483648") or float32
// ("-1.17549435e-38") JSON writes, its comma, and room for spaces. With the brackets of a row this
// bounds a compact (or lightly spaced) body of MaxRequestRows rows.
const (
	bytesPerToken = 16
	bytesPerFloat = 24
	bytesPerRow   = 8
	bodyOverhead  = 256
)

// NewService loads the model, starts the engine and releases the model handle (the engine keeps
// what it needs).
func NewService(cfg Config) (*Service, error) {
	if cfg.Sessions < 1 || cfg.Threads < 1 || cfg.MaxRequestRows < 1 || cfg.MaxInFlight < 1 {
		return nil, fmt.Errorf("sessions, threads, max-request-rows and max-in-flight must be at least 1")
	}
	if cfg.Batch && cfg.MaxRequestRows > cfg.MaxBatchRows {
		return nil, fmt.Errorf("max-request-rows %d exceeds max-batch-rows %d: such a request could never run",
			cfg.MaxRequestRows, cfg.MaxBatchRows)
	}
	model, err := moert.LoadModel(cfg.ModelPath)
	if err != nil {
		return nil, err
	}
	defer model.Close()
	info := ModelInfo{MaxRows: cfg.MaxRequestRows}
	if info.Name, err = model.Name(); err != nil {
		return nil, err
	}
	io, err := model.IO()
	if err != nil {
		return nil, err
	}
	info.InputWidth, info.OutputWidth = io.InputWidth, io.OutputWidth
	perValue := int64(bytesPerFloat)
	info.InputKind = "hidden"
	if io.Input == moert.InputTokens {
		info.InputKind, perValue = "tokens", bytesPerToken
		if info.VocabSize, err = model.VocabSize(); err != nil {
			return nil, err
		}
	}
	if info.Layers, err = model.NumLayers(); err != nil {
		return nil, err
	}
	if info.Parameters, _, err = model.NumParameters(); err != nil {
		return nil, err
	}
	bodyLimit := int64(cfg.MaxRequestRows)*(int64(io.InputWidth)*perValue+bytesPerRow) + bodyOverhead
	info.BodyLimit = bodyLimit

	sessionOpts, err := moert.NewSessionOptions()
	if err != nil {
		return nil, err
	}
	defer sessionOpts.Close()
	if err := sessionOpts.SetThreads(cfg.Threads); err != nil {
		return nil, err
	}
	var eng engine
	if cfg.Batch {
		eng, err = newBatchEngine(model, sessionOpts, cfg)
	} else {
		eng, err = newPoolEngine(model, sessionOpts, cfg.Sessions)
	}
	if err != nil {
		return nil, err
	}
	return &Service{cfg: cfg, info: info, engine: eng, bodyLimit: bodyLimit,
		slots: make(chan struct{}, cfg.MaxInFlight)}, nil
}

// Info describes the model served.
func (s *Service) Info() ModelInfo { return s.info }

// BodyLimit is the largest request body accepted, in bytes.
func (s *Service) BodyLimit() int64 { return s.bodyLimit }

// Mode names the engine.
func (s *Service) Mode() string {
	if s.cfg.Batch {
		return fmt.Sprintf("batcher (passes of up to %d rows, wait %v)", s.cfg.MaxBatchRows, s.cfg.MaxWait)
	}
	return "solo sessions (one request per pass)"
}

// InFlight is the number of requests being served, counting those abandoned by their client
// (or timed out) that the batcher still holds.
func (s *Service) InFlight() int { return len(s.slots) }

// Drain makes /healthz answer 503 and new forward requests be refused with 503, while the
// requests in flight finish.
func (s *Service) Drain() { s.draining.Store(true) }

// Close releases the engine; call it after the HTTP server has drained.
func (s *Service) Close() { s.engine.close() }

// Handler routes the API.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/forward", s.forward)
	mux.HandleFunc("/model", s.getOnly(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.info)
	}))
	mux.HandleFunc("/metrics", s.getOnly(s.metrics))
	mux.HandleFunc("/healthz", s.getOnly(func(w http.ResponseWriter, r *http.Request) {
		if s.draining.Load() {
			writeError(w, errShuttingDown())
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{Status: http.StatusNotFound, Code: "not_found",
			Message: fmt.Sprintf("no endpoint %q: POST /forward, GET /model, /metrics, /healthz", r.URL.Path)})
	})
	return mux
}

func (s *Service) getOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			writeError(w, errMethod(r.Method, "GET, HEAD"))
			return
		}
		h(w, r)
	}
}

func (s *Service) forward(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		writeError(w, errMethod(r.Method, "POST"))
		return
	}
	if s.draining.Load() {
		writeError(w, errShuttingDown())
		return
	}
	// The bound on requests in flight comes before the body is read: memory is at most
	// MaxInFlight bodies of BodyLimit bytes and their rows.
	select {
	case s.slots <- struct{}{}:
	default:
		s.rejected.Add(1)
		w.Header().Set("Retry-After", "1")
		writeError(w, &apiError{Status: http.StatusServiceUnavailable, Code: "overloaded",
			Message: fmt.Sprintf("%d requests are in flight, the most this service serves at once", s.cfg.MaxInFlight)})
		return
	}
	// The slot comes back when the request's work is over: at the handler's return, or, for a
	// request abandoned while its pass was still to come, once that pass has answered it, so
	// abandoned requests count against MaxInFlight as long as the batcher holds them.
	var late <-chan struct{}
	defer func() {
		if late == nil {
			<-s.slots
			return
		}
		go func() {
			<-late
			<-s.slots
		}()
	}()
	s.requests.Add(1)
	req, apiErr := s.parse(w, r)
	if apiErr == nil {
		// The request's context ends when its client goes away; RequestTimeout bounds it too.
		ctx := r.Context()
		if s.cfg.RequestTimeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, s.cfg.RequestTimeout)
			defer cancel()
		}
		var out []float32
		var st moert.RequestStats
		var err error
		if req.tokens != nil {
			out, st, err = s.engine.forwardTokens(ctx, req.tokens, req.rows)
		} else {
			out, st, err = s.engine.forwardHidden(ctx, req.hidden, req.rows)
		}
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			var ab *abandonedError
			if errors.As(err, &ab) {
				late = ab.late
			}
			s.abandoned.Add(1)
			s.failed.Add(1)
			if r.Context().Err() != nil {
				return // the client is gone: nobody reads an answer
			}
			writeError(w, &apiError{Status: http.StatusServiceUnavailable, Code: "timeout",
				Message: fmt.Sprintf("no answer within %v", s.cfg.RequestTimeout)})
			return
		}
		if err == nil {
			w.Header().Set("Moert-Batch-Rows", fmt.Sprint(st.BatchRows))
			w.Header().Set("Moert-Batch-Requests", fmt.Sprint(st.BatchRequests))
			w.Header().Set("Moert-Queue-Microseconds", fmt.Sprint(st.Queue.Microseconds()))
			w.Header().Set("Moert-Run-Microseconds", fmt.Sprint(st.Run.Microseconds()))
			if apiErr = writeOutputs(w, out, req.rows, s.info.OutputWidth); apiErr == nil {
				return
			}
		} else {
			apiErr = fromLibrary(err)
		}
	}
	s.failed.Add(1)
	writeError(w, apiErr)
}

// Metrics is what GET /metrics answers.
type Metrics struct {
	Requests          int64   `json:"requests"`            // forward requests admitted
	Failed            int64   `json:"failed"`              // of those, answered with an error
	Rejected          int64   `json:"rejected"`            // refused: too many in flight
	Abandoned         int64   `json:"abandoned"`           // of the failed, left by their client or timed out
	InFlight          int     `json:"in_flight"`           // being served now
	Passes            int64   `json:"passes"`              // forward passes run
	PassRows          int64   `json:"pass_rows"`           // rows of those passes
	MeanBatchRows     float64 `json:"mean_batch_rows"`     // pass_rows / passes
	QueueSecondsTotal float64 `json:"queue_seconds_total"` // time requests waited for a pass
	RunSecondsTotal   float64 `json:"run_seconds_total"`   // time the passes took
	HeapBytes         uint64  `json:"go_heap_bytes"`
	Goroutines        int     `json:"goroutines"`
}

func (s *Service) metrics(w http.ResponseWriter, r *http.Request) {
	c := s.engine.counters()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	writeJSON(w, http.StatusOK, Metrics{
		Requests: s.requests.Load(), Failed: s.failed.Load(), Rejected: s.rejected.Load(),
		Abandoned: s.abandoned.Load(),
		InFlight:  s.InFlight(), Passes: c.Batches, PassRows: c.Rows, MeanBatchRows: c.MeanBatchRows(),
		QueueSecondsTotal: c.Queue.Seconds(), RunSecondsTotal: c.Run.Seconds(),
		HeapBytes: ms.HeapInuse, Goroutines: runtime.NumGoroutine(),
	})
}

// batchEngine: the library gathers concurrent requests. Requests are submitted, and the
// handler's goroutine waits on the Pending, parked on a channel: it holds no OS thread and no P
// while the pass runs (a blocking ForwardTokens would hold both), so requests in flight need no
// GOMAXPROCS of their own. When the request's context ends first, the handler returns at once
// and the answer is dropped when it arrives.
type batchEngine struct{ b *moert.Batcher }

func newBatchEngine(model *moert.Model, so *moert.SessionOptions, cfg Config) (*batchEngine, error) {
	opts, err := moert.NewBatcherOptions()
	if err != nil {
		return nil, err
	}
	defer opts.Close()
	for _, err := range []error{opts.SetSessionOptions(so), opts.SetSessions(cfg.Sessions),
		opts.SetMaxBatchRows(cfg.MaxBatchRows), opts.SetMaxWait(cfg.MaxWait)} {
		if err != nil {
			return nil, err
		}
	}
	b, err := moert.NewBatcher(model, opts)
	if err != nil {
		return nil, err
	}
	return &batchEngine{b}, nil
}

func (e *batchEngine) forwardTokens(ctx context.Context, ids []int32, rows int) ([]float32, moert.RequestStats, error) {
	p, err := e.b.SubmitTokens(ids, rows)
	if err != nil {
		return nil, moert.RequestStats{}, err
	}
	return wait(ctx, p)
}

func (e *batchEngine) forwardHidden(ctx context.Context, in []float32, rows int) ([]float32, moert.RequestStats, error) {
	p, err := e.b.SubmitHidden(in, rows)
	if err != nil {
		return nil, moert.RequestStats{}, err
	}
	return wait(ctx, p)
}

// abandonedError is ctx's error for a request whose answer is still to come: late closes when
// the batcher has answered it.
type abandonedError struct {
	err  error
	late <-chan struct{}
}

func (e *abandonedError) Error() string { return e.err.Error() }
func (e *abandonedError) Unwrap() error { return e.err }

// wait is p's answer, or, if ctx ends first, ctx's error as an *abandonedError.
func wait(ctx context.Context, p *moert.Pending) ([]float32, moert.RequestStats, error) {
	select {
	case <-p.Done():
		return p.Wait()
	case <-ctx.Done():
		return nil, moert.RequestStats{}, &abandonedError{err: ctx.Err(), late: p.Done()}
	}
}

func (e *batchEngine) counters() moert.BatcherCounters {
	c, _ := e.b.Counters()
	return c
}

func (e *batchEngine) close() { e.b.Close() }

// poolEngine: each request takes a free session of the pool and runs alone — the baseline the
// batcher is measured against. A request waiting for a session gives up when its context ends;
// one running holds its goroutine (and an OS thread) in C until its pass is over.
type poolEngine struct {
	sessions chan *moert.Session
	all      []*moert.Session
	passes   atomic.Int64
	rows     atomic.Int64
	queue    atomic.Int64 // ns
	run      atomic.Int64 // ns
}

func newPoolEngine(model *moert.Model, so *moert.SessionOptions, n int) (*poolEngine, error) {
	e := &poolEngine{sessions: make(chan *moert.Session, n)}
	for i := 0; i < n; i++ {
		s, err := moert.NewSession(model, so)
		if err != nil {
			e.close()
			return nil, err
		}
		e.all = append(e.all, s)
		e.sessions <- s
	}
	return e, nil
}

func (e *poolEngine) do(ctx context.Context, rows int, f func(*moert.Session) ([]float32, error)) ([]float32, moert.RequestStats, error) {
	start := time.Now()
	var s *moert.Session
	select {
	case s = <-e.sessions:
	case <-ctx.Done():
		return nil, moert.RequestStats{}, ctx.Err()
	}
	defer func() { e.sessions <- s }()
	began := time.Now()
	out, err := f(s)
	st := moert.RequestStats{Queue: began.Sub(start), Run: time.Since(began), BatchRows: rows, BatchRequests: 1}
	if err == nil {
		e.passes.Add(1)
		e.rows.Add(int64(rows))
		e.queue.Add(int64(st.Queue))
		e.run.Add(int64(st.Run))
	}
	return out, st, err
}

func (e *poolEngine) forwardTokens(ctx context.Context, ids []int32, rows int) ([]float32, moert.RequestStats, error) {
	return e.do(ctx, rows, func(s *moert.Session) ([]float32, error) { return s.ForwardTokens(ids, rows) })
}

func (e *poolEngine) forwardHidden(ctx context.Context, in []float32, rows int) ([]float32, moert.RequestStats, error) {
	return e.do(ctx, rows, func(s *moert.Session) ([]float32, error) { return s.ForwardHidden(in, rows) })
}

func (e *poolEngine) counters() moert.BatcherCounters {
	return moert.BatcherCounters{Batches: e.passes.Load(), Rows: e.rows.Load(),
		Queue: time.Duration(e.queue.Load()), Run: time.Duration(e.run.Load())}
}

func (e *poolEngine) close() {
	for _, s := range e.all {
		s.Close()
	}
}

// fromLibrary maps a library error to the API's.
func fromLibrary(err error) *apiError {
	var me *moert.Error
	if !errors.As(err, &me) {
		return &apiError{Status: http.StatusInternalServerError, Code: "internal", Message: err.Error()}
	}
	switch me.Code {
	case moert.ErrInvalidArgument:
		return &apiError{Status: http.StatusBadRequest, Code: "invalid_argument", Message: me.Message}
	case moert.ErrNumeric:
		return &apiError{Status: http.StatusBadRequest, Code: "numeric", Message: me.Message}
	case moert.ErrOutOfMemory:
		return &apiError{Status: http.StatusServiceUnavailable, Code: "out_of_memory", Message: me.Message}
	case moert.ErrInvalidState:
		return errShuttingDown()
	}
	return &apiError{Status: http.StatusInternalServerError, Code: "internal", Message: me.Error()}
}

// Command service serves a moert model over HTTP, as a production service would: requests from
// many connections are gathered by a moert.Batcher into shared forward passes (each handler
// submits its request and waits on the moert.Pending, holding no OS thread while the pass runs,
// and gives up when its client leaves or -request-timeout passes); bodies are bounded by the
// model's width and a row cap; concurrent requests, read and write times are bounded; every
// error is a JSON object of one shape; SIGTERM and SIGINT drain the requests in flight before
// the process exits.
//
//	service -model ../models/tiny_moe.moert -addr 127.0.0.1:8080
//
//	POST /forward   Content-Type: application/json
//	                {"tokens": [[1,2,3,4], ...]}     token-id rows, for token models
//	                {"hidden": [[0.1, ...], ...]}    hidden-state rows, for hidden-state models
//	             -> 200 {"rows": 2, "width": 64, "outputs": [[...], ...]}
//	GET  /model   -> {"name": "tiny-moe", "input_kind": "tokens", "input_width": 4, ...}
//	GET  /metrics -> requests, failures, passes, mean batch size, queue and run time, memory
//	GET  /healthz -> 200 {"status": "ok"}, or 503 while draining
//
// Errors: {"error": {"code": "bad_token", "message": "...", "row": 2, "column": 1}} with the
// HTTP status of the code (see errors.go); "row" and "column" are 0-based indices into the
// request's array and are present only where one row or value is at fault.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// run is the whole program: it returns the exit status. The listening address is printed to
// stdout as "listening on http://ADDR" once requests are accepted.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("service", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg := DefaultConfig()
	fs.StringVar(&cfg.ModelPath, "model", "", "model file (required), e.g. ../models/tiny_moe.moert")
	addr := fs.String("addr", "127.0.0.1:8080", "listen address (port 0: any free port)")
	fs.BoolVar(&cfg.Batch, "batch", cfg.Batch, "gather concurrent requests into shared passes (false: each request runs alone on a pool session)")
	fs.IntVar(&cfg.Sessions, "sessions", cfg.Sessions, "inference sessions (passes that run at once)")
	fs.IntVar(&cfg.Threads, "threads", cfg.Threads, "threads per session (sessions x threads ~ cores)")
	fs.IntVar(&cfg.MaxBatchRows, "max-batch-rows", cfg.MaxBatchRows, "rows one pass gathers at most")
	fs.DurationVar(&cfg.MaxWait, "max-wait", cfg.MaxWait, "how long a free session waits for more rows")
	fs.IntVar(&cfg.MaxRequestRows, "max-request-rows", cfg.MaxRequestRows, "rows one request may have (bounds the body size)")
	fs.IntVar(&cfg.MaxInFlight, "max-in-flight", cfg.MaxInFlight, "requests served at once; more are refused with 503")
	readTimeout := fs.Duration("read-timeout", 15*time.Second, "time to read a whole request")
	writeTimeout := fs.Duration("write-timeout", 30*time.Second, "time from the end of the request headers to the end of the response")
	idleTimeout := fs.Duration("idle-timeout", 120*time.Second, "keep-alive connections idle longer are closed")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", 0, "how long a request waits for its answer before a 503 timeout (0: 9/10 of -write-timeout, so that the 503 can still be written)")
	drainTimeout := fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long requests in flight may take to finish")
	pprofAddr := fs.String("pprof", "", "also serve Go's profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6060 (default: off)")
	gomaxprocs := fs.Int("gomaxprocs", defaultGOMAXPROCS(), "Go's GOMAXPROCS: well above the core count for -batch=false, see defaultGOMAXPROCS")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if cfg.ModelPath == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: service -model FILE [-addr HOST:PORT] [flags]; -help lists them")
		return 2
	}
	logger := log.New(stderr, "service: ", log.LstdFlags)
	if *gomaxprocs < 1 {
		fmt.Fprintln(stderr, "-gomaxprocs must be at least 1")
		return 2
	}
	runtime.GOMAXPROCS(*gomaxprocs)
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = *writeTimeout * 9 / 10
	}

	svc, err := NewService(cfg)
	if err != nil {
		logger.Print(err)
		return 1
	}
	defer svc.Close()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		logger.Print(err)
		return 1
	}
	srv := &http.Server{
		Handler:           svc.Handler(),
		ReadHeaderTimeout: min(*readTimeout, 5*time.Second),
		ReadTimeout:       *readTimeout,
		WriteTimeout:      *writeTimeout,
		IdleTimeout:       *idleTimeout,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          logger,
	}

	if *pprofAddr != "" {
		pln, err := net.Listen("tcp", *pprofAddr)
		if err != nil {
			logger.Print(err)
			return 1
		}
		defer pln.Close()
		go http.Serve(pln, profileHandler())
		fmt.Fprintf(stdout, "pprof on http://%s/debug/pprof/\n", pln.Addr())
	}

	// Signals are caught before the address is announced, so a SIGTERM that follows the
	// announcement always drains.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	info := svc.Info()
	logger.Printf("%s (%s input, %d -> %d): %s, %d sessions x %d threads, %d cores; body limit %d bytes",
		info.Name, info.InputKind, info.InputWidth, info.OutputWidth, svc.Mode(), cfg.Sessions,
		cfg.Threads, runtime.NumCPU(), svc.BodyLimit())
	fmt.Fprintf(stdout, "listening on http://%s\n", ln.Addr())

	select {
	case err := <-served:
		logger.Print(err)
		return 1
	case <-ctx.Done():
	}
	// Drain: /healthz turns 503 so a load balancer stops sending; Shutdown closes the listener,
	// then waits for every request in flight to be answered; only then is the model released.
	stop()
	logger.Printf("draining %d requests in flight", svc.InFlight())
	svc.Drain()
	drain, cancel := context.WithTimeout(context.Background(), *drainTimeout)
	defer cancel()
	if err := srv.Shutdown(drain); err != nil {
		logger.Printf("drain: %v", err)
		srv.Close()
		return 1
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		logger.Print(err)
	}
	logger.Print("drained")
	return 0
}

// profileHandler serves Go's profiles on their own listener, never on the service's: they
// reveal the process's internals. A CPU profile sends SIGPROF to every thread 100 times a
// second, the library's GEMM threads included; moert blocks signals while a GEMM runs (moert.h,
// "Signals"), which TestCPUProfileUnderLoad checks.
func profileHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// defaultGOMAXPROCS is 4 per core and at least 16, for the engine that still needs it: with
// -batch=false every request's goroutine waits inside a session's C call for its pass, and Go
// counts a goroutine in a C call against GOMAXPROCS until its monitor thread notices and hands
// the P to another goroutine, which can take up to about 10 ms. With GOMAXPROCS at the core
// count, the goroutines waiting in C held the Ps that the HTTP handlers needed to read the next
// requests. The batcher engine made blocking calls too until it submitted its requests: measured
// then on 2 cores at 64 clients, requests spent a p99 of 142-180 ms outside the library while
// the CPUs were half idle, and the passes stayed at 5 rows; with 16 Ps the passes grew to 30
// rows, throughput rose 1.4x and p99 fell to 45 ms (README, "Benchmark"). Now its handlers wait
// on a moert.Pending, parked without a thread or a P, and it ran as well at GOMAXPROCS 2 as at
// 16 (README). The default stays: extra Ps cost nothing while idle.
func defaultGOMAXPROCS() int {
	if n := 4 * runtime.NumCPU(); n > 16 {
		return n
	}
	return 16
}

func min(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

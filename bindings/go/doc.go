// Package moert runs Mixture-of-Experts models through libmoert, the moert C library.
//
// It is the idiomatic layer over moert.dev/moert/internal/capi, which SWIG generates from
// moert.h. Every fallible call returns (T, error); a library error is an *Error carrying the
// status code and message. Model, SessionOptions and Session hold C handles: Close releases them
// (a second Close does nothing, nor does Close on a nil handle, so a deferred Close may come
// before the error check), and a finalizer releases any the program forgets. A nil *Model given
// to NewSession or NewBatcher is an ErrInvalidArgument; other methods on a nil handle panic, as
// Go's own types do.
//
// Concurrency follows moert.h: a Model may be used from any number of goroutines; a Session may
// be called from many goroutines at once, the library serialising the calls; a SessionOptions
// must not be modified concurrently. Close waits for calls in flight on the same handle.
//
// Calls that compute (a Session's forward, backward and step, a Batcher's blocking requests) run
// in C for their whole duration, holding an OS thread, and Go counts a goroutine in a C call
// against GOMAXPROCS until the runtime hands its P to another goroutine, which can take up to
// about 10 ms. A server making such calls from many goroutines at once should run with
// GOMAXPROCS well above the core count (see Batcher). A Batcher's submitted requests
// (SubmitTokens, SubmitHidden) are the exception: the call returns once the request is queued,
// and the goroutine waiting on its Pending is parked on a channel, holding no thread and no P,
// until one of the library's threads hands the answer over. While a call computes, its thread
// takes no asynchronous signal (a CPU profile's SIGPROF included) until the call returns: see
// "Signals" in moert.h.
//
// The package checks at start-up that the loaded libmoert implements the ABI it was built for;
// when it does not, every constructor returns an *Error with code ErrUnsupported.
//
// The library is found through pkg-config (package "moert"): set PKG_CONFIG_PATH to the
// directory of moert.pc when it is not installed where pkg-config looks by default.
package moert

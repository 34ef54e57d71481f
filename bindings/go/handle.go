package moert

import (
	"fmt"
	"math"
	"strings"
	"sync"
)

// guard makes a C handle safe to Close while other goroutines use it: calls hold the read lock,
// Close takes the write lock, so moert_*_free never races with a call (moert.h forbids that),
// and a handle used after Close gives an error instead of touching freed memory.
type guard struct {
	mu     sync.RWMutex
	closed bool
	what   string
}

// enter starts a call on the handle; the caller runs leave() when it is done.
func (g *guard) enter() error {
	g.mu.RLock()
	if g.closed {
		g.mu.RUnlock()
		return &Error{Code: ErrInvalidState, Message: g.what + " is closed"}
	}
	return nil
}

func (g *guard) leave() { g.mu.RUnlock() }

// close runs free once, after the calls in flight have finished; later calls do nothing.
func (g *guard) close(free func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.closed {
		g.closed = true
		free()
	}
}

// index32 converts an index or count to the uint32 the C ABI takes.
func index32(what string, v int) (uint32, error) {
	if v < 0 || uint64(v) > math.MaxUint32 {
		return 0, &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf("%s %d out of range", what, v)}
	}
	return uint32(v), nil
}

// noNUL refuses a string the C side would silently cut at an embedded NUL.
func noNUL(what, s string) error {
	if strings.IndexByte(s, 0) >= 0 {
		return &Error{Code: ErrInvalidArgument, Message: what + " contains a NUL byte"}
	}
	return nil
}

// flag is a Go bool as the C ABI's int32 flags take it.
func flag(on bool) int32 {
	if on {
		return 1
	}
	return 0
}

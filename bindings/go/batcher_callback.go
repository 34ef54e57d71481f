package moert

// The C callback of the Batcher's submitted requests. This file exports a Go function to C, so
// cgo allows only declarations in its preamble: the C trampoline that moert calls is defined in
// batcher_cgo.go.

// #cgo pkg-config: moert
// #include <stdint.h>
// #include <moert/moert.h>
import "C"

import (
	"runtime/cgo"
	"unsafe"

	"moert.dev/moert/internal/capi"
)

// moertGoBatcherDone answers one submitted request: userData is the cgo.Handle of its *Pending.
// It runs on one of the batcher's C threads, or on the goroutine closing the batcher for a
// request still queued then, and keeps to copying the answer out of the library's memory
// (valid only during this call), freeing the status and closing the Pending's channel.
//
//export moertGoBatcherDone
func moertGoBatcherDone(userData unsafe.Pointer, status *C.moert_status, out *C.float, outLen C.uint64_t,
	stats *C.int64_t, statsLen C.uint64_t) {
	h := cgo.Handle(uintptr(userData))
	p := h.Value().(*Pending)
	h.Delete()
	if status != nil {
		// check frees the status, which the callback owns.
		p.err = check(capi.SwigcptrStruct_SS_moert_status(uintptr(unsafe.Pointer(status))))
	} else {
		p.out = make([]float32, int(outLen))
		if outLen > 0 {
			copy(p.out, unsafe.Slice((*float32)(unsafe.Pointer(out)), int(outLen)))
		}
		// Figures this package does not know are dropped; ones the library does not give are -1,
		// as for the blocking calls.
		s := make([]int64, capi.MOERT_REQUEST_STATS)
		for i := range s {
			s[i] = -1
		}
		if statsLen > 0 && stats != nil {
			copy(s, unsafe.Slice((*int64)(unsafe.Pointer(stats)), int(statsLen)))
		}
		p.stats = requestStats(s)
	}
	p.batcher = nil
	close(p.done)
}

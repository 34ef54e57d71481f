package moert

// The C side of the Batcher's submitted requests: a trampoline with exactly the signature of
// moert_batcher_callback that forwards to the Go function moertGoBatcherDone
// (batcher_callback.go), whose cgo prototype has no const qualifiers.

// #cgo pkg-config: moert
// #include <stdint.h>
// #include <moert/moert.h>
//
// extern void moertGoBatcherDone(void*, moert_status*, float*, uint64_t, int64_t*, uint64_t);
//
// static inline void moert_go_batcher_done(void* user_data, moert_status* status,
//                                          const float* out, uint64_t out_len,
//                                          const int64_t* stats, uint64_t stats_len) {
//   moertGoBatcherDone(user_data, status, (float*)out, out_len, (int64_t*)stats, stats_len);
// }
//
// static inline moert_batcher_callback moert_go_batcher_callback(void) {
//   return moert_go_batcher_done;
// }
import "C"

import "unsafe"

// batcherCallback is the address of the C trampoline, as the generated layer takes a function
// pointer (an unexported *byte type, to which a *byte is assignable). It points into C code,
// never into Go memory.
func batcherCallback() *byte {
	return (*byte)(unsafe.Pointer(C.moert_go_batcher_callback()))
}

package moert

// Caller memory and cgo.
//
// cgo's default check (cgocheck=1) panics with "cgo argument has Go pointer to Go pointer" when a
// slice handed to C lies inside a Go object that also holds pointers — a [5]float32 field of a
// struct with a *int, passed as h.buf[:] — because the generated layer passes the slice as an
// untyped pointer and cgo then checks the whole enclosing object. C reads only the floats, so the
// call is safe, but the process dies. Go 1.19 has no runtime.Pinner, so every entry point copies
// the slices a caller hands in into fresh pointer-free allocations before the call (and outputs
// back after a successful one): any valid Go memory layout works under every cgocheck setting,
// for the price of one copy, small beside a forward pass. Buffers this package allocates itself
// are passed directly.

// ownFloats is a pointer-free copy of s (nil stays nil, empty stays empty and non-nil).
func ownFloats(s []float32) []float32 {
	if s == nil {
		return nil
	}
	c := make([]float32, len(s))
	copy(c, s)
	return c
}

func ownInts(s []int32) []int32 {
	if s == nil {
		return nil
	}
	c := make([]int32, len(s))
	copy(c, s)
	return c
}

func ownFloat64s(s []float64) []float64 {
	if s == nil {
		return nil
	}
	c := make([]float64, len(s))
	copy(c, s)
	return c
}

func ownBytes(s []byte) []byte {
	if s == nil {
		return nil
	}
	c := make([]byte, len(s))
	copy(c, s)
	return c
}

// ownMask is a pointer-free byte copy of a row mask, one byte per row: 1 for true, 0 for false
// (nil stays nil, which the library refuses as a missing mask).
func ownMask(mask []bool) []byte {
	if mask == nil {
		return nil
	}
	c := make([]byte, len(mask))
	for i, v := range mask {
		if v {
			c[i] = 1
		}
	}
	return c
}

// scratchFloats is a pointer-free buffer of len(out) to receive an output that is then copied
// into out; nil for nil.
func scratchFloats(out []float32) []float32 {
	if out == nil {
		return nil
	}
	return make([]float32, len(out))
}

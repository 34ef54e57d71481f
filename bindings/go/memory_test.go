package moert

import (
	"os"
	"testing"
)

// The layout of issue 15 part 3: a fixed array inside a struct that also holds a Go pointer. cgo
// checks the whole enclosing object of an untyped pointer, so before memory.go such a slice
// panicked with "cgo argument has Go pointer to Go pointer" under the default cgocheck.
type hiddenHolder struct {
	next *int
	buf  [5]float32
	name string
	out  [5]float32
	grad [5]float32
}

type tokenHolder struct {
	owner   *tokenHolder
	ids     [8]int32
	targets [2]int32
	logits  [2 * 64]float32
	meta    map[string]int
}

func hiddenModelPath(t *testing.T) string {
	p := os.Getenv("MOERT_TEST_HIDDEN_MODEL")
	if p == "" {
		t.Fatal("MOERT_TEST_HIDDEN_MODEL is not set: run through CTest, or set it to examples/models/tiny_hidden.moert")
	}
	return p
}

func mustHiddenModel(t *testing.T) *Model {
	t.Helper()
	m, err := LoadModel(hiddenModelPath(t))
	if err != nil {
		t.Fatalf("LoadModel: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func equalFloats(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: [%d] = %v, want %v", what, i, got[i], want[i])
		}
	}
}

// Every entry point that takes caller memory, fed from and into slices of struct fields next to
// Go pointers, of arrays inside slices of such structs, and sub-slices at an offset: the answers
// equal those of plain slices, and nothing panics.
func TestCallerMemoryInAnyGoLayout(t *testing.T) {
	x := 3
	hm := mustHiddenModel(t)
	_, err := hm.VocabSize()
	wantCode(t, err, ErrInvalidArgument)
	hs := mustSession(t, hm, ModeInference, 1)
	plain := []float32{1, -0.5, 0.25, 2, 0.125}
	want, err := hs.ForwardHidden(plain, 1)
	if err != nil {
		t.Fatal(err)
	}

	h := &hiddenHolder{next: &x, name: "h"}
	copy(h.buf[:], plain)
	got, err := hs.ForwardHidden(h.buf[:], 1)
	if err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "ForwardHidden(h.buf[:])", got, want)
	if err := hs.ForwardHiddenInto(h.buf[:], 1, h.out[:]); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "ForwardHiddenInto(h.buf[:], h.out[:])", h.out[:], want)

	// An array in a slice of such structs, and a sub-slice at an offset of a longer array.
	many := make([]hiddenHolder, 3)
	many[2].next = &x
	copy(many[2].buf[:], plain)
	if err := hs.ForwardHiddenInto(many[2].buf[:], 1, many[1].out[:]); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "slice of structs", many[1].out[:], want)
	var wide struct {
		p    *int
		vals [12]float32
	}
	wide.p = &x
	copy(wide.vals[4:9], plain)
	if err := hs.ForwardHiddenInto(wide.vals[4:9], 1, wide.vals[7:12]); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "overlapping sub-slices", wide.vals[7:12], want)

	// Token model: ids, targets and logits in a struct with pointers.
	tm := mustModel(t)
	ts := mustSession(t, tm, ModeInference, 1)
	ids := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	wantLogits, err := ts.ForwardTokens(ids, 2)
	if err != nil {
		t.Fatal(err)
	}
	th := &tokenHolder{meta: map[string]int{"a": 1}}
	th.owner = th
	copy(th.ids[:], ids)
	if err := ts.ForwardTokensInto(th.ids[:], 2, th.logits[:]); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "ForwardTokensInto(th.ids[:], th.logits[:])", th.logits[:], wantLogits)
	if got, err = ts.ForwardTokens(th.ids[:], 2); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "ForwardTokens(th.ids[:])", got, wantLogits)

	// Training entry points.
	tr := mustSession(t, tm, ModeTraining, 1)
	if _, err := tr.ForwardTokens(th.ids[:], 2); err != nil {
		t.Fatal(err)
	}
	th.targets = [2]int32{5, 9}
	if _, err := tr.BackwardLoss(th.targets[:]); err != nil {
		t.Fatal(err)
	}
	w, err := tr.GetParameter("head.weight")
	if err != nil {
		t.Fatal(err)
	}
	var pw struct {
		p    *int
		vals []float32
		arr  [64 * 64]float32
	}
	pw.p = &x
	copy(pw.arr[:], w)
	pw.arr[0] = 0.5
	if err := tr.SetParameter("head.weight", pw.arr[:]); err != nil {
		t.Fatal(err)
	}
	if err := tr.SetGradient("head.weight", pw.arr[:]); err != nil {
		t.Fatal(err)
	}
	back, _ := tr.GetGradient("head.weight")
	equalFloats(t, "SetGradient(pw.arr[:])", back, pw.arr[:])
	var bias struct {
		p *int
		b [8]float32
	}
	bias.p = &x
	bias.b[3] = 0.25
	if err := tr.SetExpertBias(2, bias.b[:]); err != nil {
		t.Fatal(err)
	}
	if got, _ := tr.ExpertBias(2); got[3] != 0.25 {
		t.Fatalf("SetExpertBias(bias.b[:]) read back %v", got)
	}

	// Backward with the input gradient into a struct field (hidden model, training).
	htr := mustSession(t, hm, ModeTraining, 1)
	if _, err := htr.ForwardHidden(h.buf[:], 1); err != nil {
		t.Fatal(err)
	}
	copy(h.out[:], []float32{1, 1, 1, 1, 1})
	h.grad = [5]float32{9, 9, 9, 9, 9}
	if _, err := htr.Backward(h.out[:], h.grad[:]); err != nil {
		t.Fatal(err)
	}
	if h.grad == [5]float32{9, 9, 9, 9, 9} {
		t.Fatal("Backward did not write the input gradient into h.grad[:]")
	}

	// A model from bytes inside a struct with pointers.
	data, err := os.ReadFile(hiddenModelPath(t))
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		p     *int
		bytes []byte
		arr   [4096]byte
	}
	file.p = &x
	n := copy(file.arr[:], data)
	if n != len(data) {
		t.Fatalf("test model larger than %d bytes", len(file.arr))
	}
	fm, err := LoadModelBytes(file.arr[:n], "")
	if err != nil {
		t.Fatal(err)
	}
	fm.Close()

	// The batcher.
	b, err := NewBatcher(hm, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	h.out = [5]float32{}
	if _, err := b.ForwardHiddenInto(h.buf[:], 1, h.out[:]); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "Batcher.ForwardHiddenInto(h.buf[:], h.out[:])", h.out[:], want)
	if got, _, err = b.ForwardHidden(h.buf[:], 1); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "Batcher.ForwardHidden(h.buf[:])", got, want)
	tb, err := NewBatcher(tm, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Close()
	th.logits = [128]float32{}
	if _, err := tb.ForwardTokensInto(th.ids[:], 2, th.logits[:]); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "Batcher.ForwardTokensInto(th.ids[:], th.logits[:])", th.logits[:], wantLogits)
	if got, _, err = tb.ForwardTokens(th.ids[:], 2); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "Batcher.ForwardTokens(th.ids[:])", got, wantLogits)
	// Submitted requests (alone in their pass, hence bit for bit).
	p, err := b.SubmitHidden(h.buf[:], 1)
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err = p.Wait(); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "Batcher.SubmitHidden(h.buf[:])", got, want)
	if p, err = tb.SubmitTokens(th.ids[:], 2); err != nil {
		t.Fatal(err)
	}
	if got, _, err = p.Wait(); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "Batcher.SubmitTokens(th.ids[:])", got, wantLogits)
}

// Empty and nil slices are errors from the library, never a crash; a failed call leaves the
// caller's output as it was.
func TestEmptyAndNilSlices(t *testing.T) {
	hm := mustHiddenModel(t)
	hs := mustSession(t, hm, ModeInference, 1)
	out := []float32{7, 7, 7, 7, 7}
	for _, in := range [][]float32{nil, {}, make([]float32, 0, 10)} {
		wantCode(t, hs.ForwardHiddenInto(in, 1, out), ErrInvalidArgument)
		if out[0] != 7 {
			t.Fatal("a failed call wrote the output")
		}
	}
	wantCode(t, hs.ForwardHiddenInto(make([]float32, 5), 1, nil), ErrInvalidArgument)
	_, err := LoadModelBytes(nil, "")
	wantCode(t, err, ErrInvalidArgument)
	_, err = LoadModelBytes([]byte{}, "")
	if err == nil {
		t.Fatal("empty model bytes accepted")
	}
}

package moert

import (
	"math"
	"strings"
	"testing"
)

// Padded batches (issue 15 part 4): a masked pass over rows with garbage in the padding gives
// zero output rows there and, bit for bit, the outputs and expert counts of a pass over the other
// rows alone.

// padRows interleaves the rows of real (width values each) with padding rows filled with pad at
// the positions where mask is false.
func padRows[T any](real []T, width int, mask []bool, pad T) []T {
	out := make([]T, 0, len(mask)*width)
	next := 0
	for _, keep := range mask {
		if keep {
			out = append(out, real[next*width:(next+1)*width]...)
			next++
			continue
		}
		for i := 0; i < width; i++ {
			out = append(out, pad)
		}
	}
	return out
}

// wantPadded checks that got holds the rows of alone where mask is true and zero rows elsewhere.
func wantPadded(t *testing.T, what string, got, alone []float32, width int, mask []bool) {
	t.Helper()
	equalFloats(t, what, got, padRows(alone, width, mask, 0))
}

func TestForwardTokensMaskedEqualsTheRowsAlone(t *testing.T) {
	m := mustModel(t)
	padded := mustSession(t, m, ModeInference, 1)
	alone := mustSession(t, m, ModeInference, 1)
	io := padded.IO()
	mask := []bool{true, false, true, true, false}
	real := batch(3, io.InputWidth, 4)
	// Padding positions hold ids outside the vocabulary [0, 64).
	tokens := padRows(real, io.InputWidth, mask, -1)
	tokens[len(tokens)-1] = 1 << 30
	want, err := alone.ForwardTokens(real, 3)
	if err != nil {
		t.Fatal(err)
	}
	got, err := padded.ForwardTokensMasked(tokens, mask, len(mask))
	if err != nil {
		t.Fatal(err)
	}
	wantPadded(t, "ForwardTokensMasked", got, want, io.OutputWidth, mask)
	for _, layer := range []int{2, 4} {
		a, err := padded.ExpertCounts(layer, CountsLast)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := alone.ExpertCounts(layer, CountsLast)
		var sum int64
		for i := range a {
			if a[i] != b[i] {
				t.Fatalf("layer %d counts %v, the rows alone %v", layer, a, b)
			}
			sum += a[i]
		}
		if sum != 3*2 { // 3 rows, top-2
			t.Fatalf("layer %d counted %d routings, want 6", layer, sum)
		}
	}

	// The Into variant, from and into memory next to Go pointers (see memory_test.go).
	x := 1
	var h struct {
		p      *int
		ids    [5 * 4]int32
		mask   [5]bool
		logits [5 * 64]float32
	}
	h.p = &x
	copy(h.ids[:], tokens)
	copy(h.mask[:], mask)
	for i := range h.logits {
		h.logits[i] = -7
	}
	if err := padded.ForwardTokensMaskedInto(h.ids[:], h.mask[:], 5, h.logits[:]); err != nil {
		t.Fatal(err)
	}
	wantPadded(t, "ForwardTokensMaskedInto", h.logits[:], want, io.OutputWidth, mask)

	// A mask without padding is the unmasked pass; an all-padding mask gives zeros.
	all := []bool{true, true, true}
	if got, err = padded.ForwardTokensMasked(real, all, 3); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "all rows take part", got, want)
	if got, err = padded.ForwardTokensMasked(tokens, make([]bool, 5), 5); err != nil {
		t.Fatal(err)
	}
	equalFloats(t, "all padding", got, make([]float32, 5*io.OutputWidth))
	c, _ := padded.ExpertCounts(2, CountsLast)
	equalInts(t, "counts of an all-padding pass", c, make([]int64, len(c)))
}

func TestForwardHiddenMaskedEqualsTheRowsAlone(t *testing.T) {
	m := mustHiddenModel(t)
	padded := mustSession(t, m, ModeInference, 1)
	alone := mustSession(t, m, ModeInference, 1)
	io := padded.IO()
	mask := []bool{false, true, false, true}
	real := []float32{1, -0.5, 0.25, 2, 0.125, -1, 0.75, 3, -2, 0.5}
	nan := float32(math.NaN())
	in := padRows(real, io.InputWidth, mask, nan)
	in[4] = float32(math.Inf(1))
	want, err := alone.ForwardHidden(real, 2)
	if err != nil {
		t.Fatal(err)
	}
	got, err := padded.ForwardHiddenMasked(in, mask, 4)
	if err != nil {
		t.Fatal(err)
	}
	wantPadded(t, "ForwardHiddenMasked", got, want, io.OutputWidth, mask)
	a, _ := padded.ExpertCounts(1, CountsLast)
	b, _ := alone.ExpertCounts(1, CountsLast)
	equalInts(t, "expert counts", a, b)

	out := make([]float32, 4*io.OutputWidth)
	for i := range out {
		out[i] = -7
	}
	if err := padded.ForwardHiddenMaskedInto(in, mask, 4, out); err != nil {
		t.Fatal(err)
	}
	wantPadded(t, "ForwardHiddenMaskedInto", out, want, io.OutputWidth, mask)

	// Training: the input gradient of a padding row is zero, and the others' are those of the
	// rows alone.
	tp := mustSession(t, m, ModeTraining, 1)
	ta := mustSession(t, m, ModeTraining, 1)
	if _, err := tp.ForwardHiddenMasked(in, mask, 4); err != nil {
		t.Fatal(err)
	}
	if _, err := ta.ForwardHidden(real, 2); err != nil {
		t.Fatal(err)
	}
	gradAlone := []float32{1, 0.5, -1, 2, 0.25, -0.5, 1, 1, 0.75, -2}
	gradOut := padRows(gradAlone, io.OutputWidth, mask, nan)
	gin, ginAlone := make([]float32, len(in)), make([]float32, len(real))
	if _, err := tp.Backward(gradOut, gin); err != nil {
		t.Fatal(err)
	}
	if _, err := ta.Backward(gradAlone, ginAlone); err != nil {
		t.Fatal(err)
	}
	wantPadded(t, "input gradient", gin, ginAlone, io.InputWidth, mask)
}

func equalInts(t *testing.T, what string, got, want []int64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %v, want %v", what, got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: %v, want %v", what, got, want)
		}
	}
}

// A mask of another length than rows, or none, is the library's error; the output is untouched.
func TestMaskOfTheWrongLength(t *testing.T) {
	m := mustHiddenModel(t)
	s := mustSession(t, m, ModeInference, 1)
	in := make([]float32, 3*5)
	out := make([]float32, 3*5)
	out[0] = 7
	err := s.ForwardHiddenMaskedInto(in, []bool{true, true}, 3, out)
	e := wantCode(t, err, ErrInvalidArgument)
	for _, part := range []string{"row mask", "2", "3"} {
		if !strings.Contains(e.Message, part) {
			t.Fatalf("message %q does not name %q", e.Message, part)
		}
	}
	if out[0] != 7 {
		t.Fatal("a failed call wrote the output")
	}
	_, err = s.ForwardHiddenMasked(in, make([]bool, 4), 3)
	wantCode(t, err, ErrInvalidArgument)
	_, err = s.ForwardHiddenMasked(in, nil, 3)
	if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "row_mask") {
		t.Fatalf("a nil mask: %q", e.Message)
	}

	tm := mustModel(t)
	ts := mustSession(t, tm, ModeInference, 1)
	_, err = ts.ForwardTokensMasked(batch(2, 4, 1), []bool{true}, 2)
	if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "row mask") {
		t.Fatalf("tokens: %q", e.Message)
	}
}

// BackwardLoss over a padded batch with an ignored target: the loss of a pass over the rows that
// take part alone, whose cross-entropy part is the mean over the rows with a target.
func TestBackwardLossIgnoresPaddingAndIgnoredTargets(t *testing.T) {
	m := mustModel(t)
	padded := mustSession(t, m, ModeTraining, 1)
	alone := mustSession(t, m, ModeTraining, 1)
	auxOnly := mustSession(t, m, ModeTraining, 1)
	mask := []bool{true, false, true, true, false}
	real := batch(3, 4, 9)
	tokens := padRows(real, 4, mask, 64)
	// Row 1 and 4 are padding (their targets are garbage); row 2 takes part with no target.
	targets := []int32{5, 12345, IgnoreTarget, 17, -3}
	targetsAlone := []int32{5, IgnoreTarget, 17}

	if _, err := padded.ForwardTokensMasked(tokens, mask, 5); err != nil {
		t.Fatal(err)
	}
	loss, err := padded.BackwardLoss(targets)
	if err != nil {
		t.Fatal(err)
	}
	logits, err := alone.ForwardTokens(real, 3)
	if err != nil {
		t.Fatal(err)
	}
	lossAlone, err := alone.BackwardLoss(targetsAlone)
	if err != nil {
		t.Fatal(err)
	}
	if loss != lossAlone {
		t.Fatalf("padded loss %v, the rows alone %v", loss, lossAlone)
	}
	// With every target ignored only the auxiliary losses remain.
	if _, err := auxOnly.ForwardTokens(real, 3); err != nil {
		t.Fatal(err)
	}
	aux, err := auxOnly.BackwardLoss([]int32{IgnoreTarget, IgnoreTarget, IgnoreTarget})
	if err != nil {
		t.Fatal(err)
	}
	ce := func(row int, target int32) float64 {
		z := logits[row*64 : (row+1)*64]
		mx := math.Inf(-1)
		for _, v := range z {
			mx = math.Max(mx, float64(v))
		}
		sum := 0.0
		for _, v := range z {
			sum += math.Exp(float64(v) - mx)
		}
		return mx + math.Log(sum) - float64(z[target])
	}
	want := (ce(0, 5)+ce(2, 17))/2 + aux
	if math.Abs(loss-want) > 1e-5 {
		t.Fatalf("loss %v, want the mean of two rows' cross-entropies plus aux = %v", loss, want)
	}
	// The gradients agree too.
	ga, _ := padded.GetGradient("head.weight")
	gb, _ := alone.GetGradient("head.weight")
	equalFloats(t, "head.weight gradient", ga, gb)

	// A bad target on a row that counts is still an error.
	if _, err := padded.ForwardTokensMasked(tokens, mask, 5); err != nil {
		t.Fatal(err)
	}
	_, err = padded.BackwardLoss([]int32{5, 0, -7, 17, 0})
	wantCode(t, err, ErrInvalidArgument)
}

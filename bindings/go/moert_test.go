package moert

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// modelPath is the example model: tokens in (a context of 4 ids from a vocabulary of 64), 6
// layers with MoE layers at 2 and 4, an output head of 64 logits.
// The tests run in the module the build assembles, so CTest names the file in MOERT_TEST_MODEL.
func modelPath(t *testing.T) string {
	p := os.Getenv("MOERT_TEST_MODEL")
	if p == "" {
		t.Fatal("MOERT_TEST_MODEL is not set: run through CTest, or set it to examples/models/tiny_moe.moert")
	}
	return p
}

func mustModel(t *testing.T) *Model {
	t.Helper()
	m, err := LoadModel(modelPath(t))
	if err != nil {
		t.Fatalf("LoadModel: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func mustSession(t *testing.T, m *Model, mode Mode, threads int) *Session {
	t.Helper()
	opts, err := NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer opts.Close()
	if err := opts.SetMode(mode); err != nil {
		t.Fatal(err)
	}
	if err := opts.SetThreads(threads); err != nil {
		t.Fatal(err)
	}
	if err := opts.SetSeed(7); err != nil {
		t.Fatal(err)
	}
	s, err := NewSession(m, opts)
	if err != nil {
		t.Fatalf("NewSession: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// batch is rows windows of token ids, deterministic in seed.
func batch(rows, width, seed int) []int32 {
	ids := make([]int32, rows*width)
	for i := range ids {
		ids[i] = int32((i*7 + i/3 + seed*13) % 64)
	}
	return ids
}

func wantCode(t *testing.T, err error, code Code) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("want an *Error with %v, got %v", code, err)
	}
	if e.Code != code || e.Message == "" {
		t.Fatalf("want code %v with a message, got %v %q", code, e.Code, e.Message)
	}
	return e
}

func TestVersions(t *testing.T) {
	if err := CheckABI(); err != nil {
		t.Fatal(err)
	}
	if ABIVersion() != BuiltABIVersion {
		t.Fatalf("ABI %d, built for %d", ABIVersion(), BuiltABIVersion)
	}
	want := fmt.Sprintf("%d.%d.%d", BuiltVersionMajor, BuiltVersionMinor, BuiltVersionPatch)
	if Version() != want {
		t.Fatalf("Version() = %q, want %q", Version(), want)
	}
	if major, _ := SchemaVersion(); major != 1 {
		t.Fatalf("schema major %d", major)
	}
	if ErrIO.String() != "MOERT_ERR_IO" {
		t.Fatalf("ErrIO.String() = %q", ErrIO.String())
	}
}

func TestModelInspection(t *testing.T) {
	m := mustModel(t)
	if name, err := m.Name(); err != nil || name != "tiny-moe" {
		t.Fatalf("Name() = %q, %v", name, err)
	}
	layers, err := m.Layers()
	if err != nil || len(layers) != 6 {
		t.Fatalf("Layers() = %v, %v", layers, err)
	}
	if l := layers[2]; l.Kind != LayerMoE || l.Name != "moe0" || l.InWidth != 64 || l.OutWidth != 64 {
		t.Fatalf("layer 2 = %+v", l)
	}
	if layers[0].Kind != LayerEmbedding || layers[5].Kind != LayerOutputHead {
		t.Fatalf("layers = %+v", layers)
	}
	io, err := m.IO()
	if err != nil || io != (IO{Input: InputTokens, InputWidth: 4, OutputWidth: 64}) {
		t.Fatalf("IO() = %+v, %v", io, err)
	}
	if v, err := m.VocabSize(); err != nil || v != 64 {
		t.Fatalf("VocabSize() = %d, %v", v, err)
	}
	total, activated, err := m.NumParameters()
	if err != nil || total != 110720 || activated != 36032 {
		t.Fatalf("NumParameters() = %d, %d, %v", total, activated, err)
	}
	for key, want := range map[MoEKey]int64{MoENumExperts: 8, MoETopK: 2, MoEScoreFunction: ScoreSigmoid,
		MoENumGroups: 4, MoETopKGroups: 2, MoEBalancingPolicy: BalancingLossFreeBias} {
		if v, err := m.MoEInt(2, key); err != nil || v != want {
			t.Fatalf("MoEInt(2, %d) = %d, %v; want %d", key, v, err, want)
		}
	}
	if v, err := m.MoEInt(4, MoEBalancingPolicy); err != nil || v != BalancingAuxLoss {
		t.Fatalf("layer 4 policy = %d, %v", v, err)
	}
	if v, err := m.MoEFloat(2, MoERoutedScaling); err != nil || v != 2.5 {
		t.Fatalf("MoEFloat(2, scaling) = %v, %v", v, err)
	}
	_, err = m.MoEInt(1, MoENumExperts)
	wantCode(t, err, ErrInvalidArgument)
	_, err = m.Layer(-1)
	wantCode(t, err, ErrInvalidArgument)
}

func TestForwardAndMetrics(t *testing.T) {
	m := mustModel(t)
	s := mustSession(t, m, ModeInference, 2)
	const rows = 32
	ids := batch(rows, 4, 0)
	out, err := s.ForwardTokens(ids, rows)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != rows*64 {
		t.Fatalf("%d outputs", len(out))
	}
	for i, v := range out {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("out[%d] = %v", i, v)
		}
	}
	again := make([]float32, rows*64)
	if err := s.ForwardTokensInto(ids, rows, again); err != nil {
		t.Fatal(err)
	}
	for i := range out {
		if out[i] != again[i] {
			t.Fatalf("forward is not deterministic at %d: %v vs %v", i, out[i], again[i])
		}
	}
	for _, layer := range []int{2, 4} {
		counts, err := s.ExpertCounts(layer, CountsLast)
		if err != nil {
			t.Fatal(err)
		}
		var sum int64
		for _, c := range counts {
			sum += c
		}
		if len(counts) != 8 || sum != rows*2 {
			t.Fatalf("layer %d counts %v (top-2 of %d rows)", layer, counts, rows)
		}
		vio, err := s.MaxVio(layer, CountsLast)
		if err != nil || vio < 0 {
			t.Fatalf("MaxVio = %v, %v", vio, err)
		}
	}
	if _, err := s.MaxVio(AllLayers, CountsLast); err != nil {
		t.Fatal(err)
	}
	eval, err := s.ExpertCounts(2, CountsEval)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.ResetMetrics(); err != nil {
		t.Fatal(err)
	}
	zero, err := s.ExpertCounts(2, CountsEval)
	if err != nil {
		t.Fatal(err)
	}
	var before, after int64
	for i := range eval {
		before += eval[i]
		after += zero[i]
	}
	if before != 2*rows*2 || after != 0 {
		t.Fatalf("eval counts %d before reset (want %d), %d after", before, 2*rows*2, after)
	}

	// Wrong sizes and ids are errors with a message, never a crash.
	wantCode(t, s.ForwardTokensInto(ids, rows, make([]float32, 3)), ErrInvalidArgument)
	_, err = s.ForwardTokens(ids[:5], rows)
	wantCode(t, err, ErrInvalidArgument)
	bad := append([]int32(nil), ids...)
	bad[0] = 1000
	_, err = s.ForwardTokens(bad, rows)
	wantCode(t, err, ErrInvalidArgument)
	_, err = s.ForwardHidden(make([]float32, 4), 1)
	if err == nil {
		t.Fatal("hidden-state input accepted by a token model")
	}
	// A row count far past the input is refused before rows*OutputWidth outputs are allocated (an
	// allocation that size would end the process with a fatal error no recover can catch).
	for _, huge := range []int{1 << 31, 1 << 40} {
		_, err = s.ForwardTokens(ids, huge)
		wantCode(t, err, ErrInvalidArgument)
		_, err = s.ForwardTokensMasked(ids, make([]bool, rows), huge)
		wantCode(t, err, ErrInvalidArgument)
		_, err = s.ForwardHidden(make([]float32, 4), huge)
		wantCode(t, err, ErrInvalidArgument)
	}
	_, err = s.ExpertCounts(1, CountsLast)
	if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "MoE layers: [2 4]") {
		t.Fatalf("the message does not list the MoE layers: %v", e)
	}
}

func TestOptionsErrors(t *testing.T) {
	opts, err := NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, opts.SetThreads(0), ErrInvalidArgument)
	wantCode(t, opts.SetConfig("no_such_knob", "1"), ErrInvalidArgument)
	wantCode(t, opts.SetMode(Mode(42)), ErrInvalidArgument)
	// Out of int32's range: refused, not truncated to another device.
	wantCode(t, opts.SetDevice(DeviceCPU, 1<<32), ErrInvalidArgument)
	wantCode(t, opts.SetDevice(DeviceCUDA, 1<<32+1), ErrInvalidArgument)
	if err := opts.SetConfig("check_finite", "false"); err != nil {
		t.Fatal(err)
	}
	if err := opts.SetDevice(DeviceCUDA, 0); err != nil {
		t.Fatal(err)
	}
	m := mustModel(t)
	if s, err := NewSession(m, opts); err == nil {
		// A build with a CUDA backend and a GPU may serve it.
		s.Close()
	} else {
		wantCode(t, err, ErrUnsupported)
	}
	opts.Close()
	opts.Close()
	wantCode(t, opts.SetSeed(1), ErrInvalidState)
}

func TestCloseTwiceAndUseAfterClose(t *testing.T) {
	m := mustModel(t)
	s := mustSession(t, m, ModeInference, 1)
	// The session keeps what it needs: the model may go first.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := m.Name()
	wantCode(t, err, ErrInvalidState)
	if _, err := s.ForwardTokens(batch(2, 4, 1), 2); err != nil {
		t.Fatalf("forward after the model was closed: %v", err)
	}
	s.Close()
	s.Close()
	_, err = s.ForwardTokens(batch(2, 4, 1), 2)
	wantCode(t, err, ErrInvalidState)
	_, err = NewSession(m, nil)
	wantCode(t, err, ErrInvalidState)
}

// A nil handle: Close accepts it (a deferred Close before the error check), a nil model is an
// argument error, not a panic; a forward of no rows says so whether the slice is nil or empty (a
// nil slice was reported as a NULL pointer).
func TestNilHandlesAndEmptyForwards(t *testing.T) {
	var s *Session
	var b *Batcher
	var m *Model
	for _, c := range []interface{ Close() error }{s, b, m, (*SessionOptions)(nil),
		(*BatcherOptions)(nil), (*LoadOptions)(nil), (*Communicator)(nil)} {
		if err := c.Close(); err != nil {
			t.Fatalf("%T.Close() = %v", c, err)
		}
	}
	_, err := NewSession(nil, nil)
	wantCode(t, err, ErrInvalidArgument)
	_, err = NewBatcher(nil, nil)
	wantCode(t, err, ErrInvalidArgument)

	model := mustModel(t)
	defer model.Close()
	session := mustSession(t, model, ModeInference, 1)
	defer session.Close()
	for _, ids := range [][]int32{nil, {}} {
		_, err = session.ForwardTokens(ids, 0)
		if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "at least 1") {
			t.Fatalf("ForwardTokens(%v, 0): %v", ids, err)
		}
		e := wantCode(t, session.ForwardTokensInto(ids, 0, nil), ErrInvalidArgument)
		if !strings.Contains(e.Message, "at least 1") {
			t.Fatalf("ForwardTokensInto(%v, 0): %v", ids, e)
		}
		// The batcher leaves the refusal to the library, which counts it.
		b := mustBatcher(t, model, 1, 16, 0)
		_, err = b.SubmitTokens(ids, 0)
		if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "at least 1") {
			t.Fatalf("SubmitTokens(%v, 0): %v", ids, err)
		}
		b.Close()
	}
	// A negative count, which the C ABI cannot take, is the library's refusal of 0 rows too: a
	// session among ranks refuses it on every rank rather than on this one alone.
	_, err = session.ForwardTokens(batch(1, 4, 0), -1)
	if e := wantCode(t, err, ErrInvalidArgument); !strings.Contains(e.Message, "at least 1") {
		t.Fatalf("ForwardTokens(ids, -1): %v", err)
	}
	_, err = session.ForwardHidden(make([]float32, 4), -1)
	wantCode(t, err, ErrInvalidArgument)
}

// trainStep runs one optimizer step over two micro-batches and returns the mean loss.
func trainStep(t *testing.T, s *Session, step int) float64 {
	t.Helper()
	const rows = 16
	if err := s.ZeroGrad(); err != nil {
		t.Fatal(err)
	}
	var sum float64
	for mb := 0; mb < 2; mb++ {
		ids := batch(rows, 4, step*2+mb)
		if _, err := s.ForwardTokens(ids, rows); err != nil {
			t.Fatal(err)
		}
		targets := make([]int32, rows)
		for r := range targets {
			targets[r] = ids[r*4+3] // predict the last token of each window
		}
		loss, err := s.BackwardLoss(targets)
		if err != nil {
			t.Fatal(err)
		}
		sum += loss
	}
	lr, norm, err := s.Step()
	if err != nil {
		t.Fatal(err)
	}
	if lr <= 0 || norm <= 0 || math.IsNaN(norm) {
		t.Fatalf("Step() = lr %v, grad norm %v", lr, norm)
	}
	return sum / 2
}

func TestTrainingStep(t *testing.T) {
	m := mustModel(t)
	s := mustSession(t, m, ModeTraining, 2)
	if err := s.SetConfig("lr", "0.01"); err != nil {
		t.Fatal(err)
	}
	params, err := s.Parameters()
	if err != nil || len(params) == 0 {
		t.Fatalf("Parameters() = %v, %v", params, err)
	}
	var w1 string
	for _, p := range params {
		if p.Name == "moe0.w1" {
			w1 = p.Name
			if p.Numel != 8*32*64 {
				t.Fatalf("moe0.w1 has %d elements", p.Numel)
			}
		}
	}
	if w1 == "" {
		t.Fatalf("no moe0.w1 among %v", params)
	}
	before, err := s.GetParameter(w1)
	if err != nil {
		t.Fatal(err)
	}

	first := trainStep(t, s, 0)
	if first < 3 || first > 6 {
		t.Fatalf("first loss %v, want about ln(64) = 4.16", first)
	}
	grad, err := s.GetGradient(w1)
	if err != nil {
		t.Fatal(err)
	}
	var gnorm float64
	for _, g := range grad {
		gnorm += float64(g) * float64(g)
	}
	if gnorm == 0 {
		t.Fatal("moe0.w1 has a zero gradient")
	}
	after, err := s.GetParameter(w1)
	if err != nil {
		t.Fatal(err)
	}
	changed := 0
	for i := range before {
		if before[i] != after[i] {
			changed++
		}
	}
	if changed == 0 {
		t.Fatal("the step changed no weight of moe0.w1")
	}
	if n, err := s.StepCount(); err != nil || n != 1 {
		t.Fatalf("StepCount() = %d, %v", n, err)
	}
	// The loss-free bias of layer 2 moved by gamma = 1e-3 per expert (sign of the imbalance).
	bias, err := s.ExpertBias(2)
	if err != nil {
		t.Fatal(err)
	}
	moved := 0
	for _, b := range bias {
		if b != 0 {
			moved++
		}
	}
	if moved == 0 {
		t.Fatalf("bias %v did not move", bias)
	}
	for i := 0; i < 5; i++ {
		trainStep(t, s, 1+i)
	}
	if last := trainStep(t, s, 0); last >= first {
		t.Fatalf("loss on the first batch did not fall: %v -> %v", first, last)
	}

	// Writing parameters, gradients and biases; freezing and scheduling the bias.
	if err := s.SetParameter(w1, before); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetParameter(w1); got[0] != before[0] {
		t.Fatal("SetParameter did not take")
	}
	nan := append([]float32(nil), before...)
	nan[0] = float32(math.NaN())
	wantCode(t, s.SetParameter(w1, nan), ErrNumeric)
	if err := s.SetGradient(w1, make([]float32, len(grad))); err != nil {
		t.Fatal(err)
	}
	zero := make([]float32, 8)
	if err := s.SetExpertBias(2, zero); err != nil {
		t.Fatal(err)
	}
	if err := s.SetBiasFrozen(AllLayers, true); err != nil {
		t.Fatal(err)
	}
	trainStep(t, s, 9)
	if b, _ := s.ExpertBias(2); b[0] != 0 {
		t.Fatalf("frozen bias moved: %v", b)
	}
	if err := s.SetBiasFrozen(AllLayers, false); err != nil {
		t.Fatal(err)
	}
	if err := s.SetBiasUpdateRate(2, 0); err != nil {
		t.Fatal(err)
	}
	wantCode(t, s.SetBiasUpdateRate(2, -1), ErrInvalidArgument)

	// Eval mode: passes count towards CountsEval only, and backward is refused.
	if err := s.SetEval(true); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ForwardTokens(batch(4, 4, 3), 4); err != nil {
		t.Fatal(err)
	}
	_, err = s.BackwardLoss(make([]int32, 4))
	wantCode(t, err, ErrInvalidState)
	if err := s.SetEval(false); err != nil {
		t.Fatal(err)
	}

	// Backward from a caller's gradient of the logits (a token model has no input gradient).
	if _, err := s.ForwardTokens(batch(4, 4, 5), 4); err != nil {
		t.Fatal(err)
	}
	gradOut := make([]float32, 4*64)
	for i := range gradOut {
		gradOut[i] = 0.01
	}
	aux, err := s.Backward(gradOut, nil)
	if err != nil || aux < 0 {
		t.Fatalf("Backward() = %v, %v", aux, err)
	}
}

func TestInferenceSessionRefusesTraining(t *testing.T) {
	s := mustSession(t, mustModel(t), ModeInference, 1)
	wantCode(t, s.ZeroGrad(), ErrInvalidState)
	_, _, err := s.Step()
	wantCode(t, err, ErrInvalidState)
}

func TestCheckpointResumesBitIdentically(t *testing.T) {
	dir := t.TempDir()
	ckpt := filepath.Join(dir, "step-2.moert")
	m := mustModel(t)

	a := mustSession(t, m, ModeTraining, 1)
	trainStep(t, a, 0)
	trainStep(t, a, 1)
	if err := a.Save(ckpt); err != nil {
		t.Fatal(err)
	}
	trainStep(t, a, 2)
	want, err := a.GetParameter("moe1.w2")
	if err != nil {
		t.Fatal(err)
	}

	b := mustSession(t, m, ModeTraining, 1)
	if err := b.Load(ckpt); err != nil {
		t.Fatal(err)
	}
	if n, _ := b.StepCount(); n != 2 {
		t.Fatalf("restored step count %d", n)
	}
	trainStep(t, b, 2)
	got, err := b.GetParameter("moe1.w2")
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("resumed run differs at %d: %v vs %v", i, got[i], want[i])
		}
	}

	// A checkpoint is also a model file, which tells its step and balancing state as saved.
	cm, err := LoadModel(ckpt)
	if err != nil {
		t.Fatal(err)
	}
	if is, step, err := cm.CheckpointStep(); err != nil || !is || step != 2 {
		t.Fatalf("CheckpointStep() = %v, %d, %v; want a checkpoint at step 2", is, step, err)
	}
	if rate, err := cm.MoEFloat(2, MoESavedBiasUpdateRate); err != nil || rate != float64(float32(0.001)) {
		t.Fatalf("saved rate %v, %v", rate, err)
	}
	if frozen, err := cm.MoEInt(2, MoESavedBiasFrozen); err != nil || frozen != 0 {
		t.Fatalf("saved freeze %v, %v", frozen, err)
	}
	cm.Close()
	if is, step, err := m.CheckpointStep(); err != nil || is || step != 0 {
		t.Fatalf("plain model: CheckpointStep() = %v, %d, %v", is, step, err)
	}
	_, err = m.MoEInt(2, MoESavedBiasFrozen)
	wantCode(t, err, ErrInvalidArgument)

	// Writing where no file can be: an error, and the old file stays.
	wantCode(t, a.Save(filepath.Join(dir, "missing", "x.moert")), ErrIO)
}

func TestCorruptFilesAreErrors(t *testing.T) {
	data, err := os.ReadFile(modelPath(t))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	truncated := filepath.Join(dir, "truncated.moert")
	if err := os.WriteFile(truncated, data[:len(data)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = LoadModel(truncated)
	e := wantCode(t, err, ErrInvalidModel)
	t.Logf("truncated model: %v", e)
	if !errors.Is(err, &Error{Code: ErrInvalidModel}) {
		t.Fatal("errors.Is does not match by code")
	}
	_, err = LoadModelBytes(data[:100], "")
	wantCode(t, err, ErrInvalidModel)
	_, err = LoadModel(filepath.Join(dir, "absent.moert"))
	wantCode(t, err, ErrIO)
	_, err = LoadModel("bad\x00path")
	wantCode(t, err, ErrInvalidArgument)

	good, err := LoadModelBytes(data, "")
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()

	// A truncated checkpoint is refused and the session keeps its state.
	s := mustSession(t, good, ModeTraining, 1)
	trainStep(t, s, 0)
	ckpt := filepath.Join(dir, "ckpt.moert")
	if err := s.Save(ckpt); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(ckpt)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ckpt, raw[:len(raw)-64], 0o644); err != nil {
		t.Fatal(err)
	}
	trainStep(t, s, 1)
	before, _ := s.GetParameter("head.weight")
	if err := s.Load(ckpt); err == nil {
		t.Fatal("truncated checkpoint accepted")
	} else {
		t.Logf("truncated checkpoint: %v", err)
	}
	after, _ := s.GetParameter("head.weight")
	if n, _ := s.StepCount(); n != 2 || before[0] != after[0] {
		t.Fatalf("refused load changed the session (step %d)", n)
	}
}

func TestSharedSessionFromManyGoroutines(t *testing.T) {
	m := mustModel(t)
	s := mustSession(t, m, ModeInference, 2)
	const workers, rows = 16, 8
	want := make([][]float32, workers)
	for w := range want {
		var err error
		if want[w], err = s.ForwardTokens(batch(rows, 4, w), rows); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				got, err := s.ForwardTokens(batch(rows, 4, w), rows)
				if err != nil {
					errs <- err
					return
				}
				for j := range got {
					if got[j] != want[w][j] {
						errs <- fmt.Errorf("worker %d: output %d differs", w, j)
						return
					}
				}
				runtime.Gosched()
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestCloseWaitsForCallsInFlight(t *testing.T) {
	m := mustModel(t)
	s := mustSession(t, m, ModeInference, 1)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				_, err := s.ForwardTokens(batch(16, 4, w), 16)
				var e *Error
				if err != nil && (!errors.As(err, &e) || e.Code != ErrInvalidState) {
					t.Errorf("forward racing Close: %v", err)
					return
				}
			}
		}(w)
	}
	s.Close()
	wg.Wait()
}

func TestQuantizeFP8HoldsExpertsAtOneBytePerValue(t *testing.T) {
	m := mustModel(t)
	before, err := m.ResidentBytes()
	if err != nil || before != 4*(110720+16) { // every parameter and the two loss-free biases
		t.Fatalf("ResidentBytes() = %d, %v", before, err)
	}
	q, n, err := m.QuantizeFP8(false)
	if err != nil || n != 9 {
		t.Fatalf("QuantizeFP8() = %d, %v", n, err)
	}
	defer q.Close()
	// moe0.w1 [8, 32, 64]: a code per value and, per expert, one block scale padded to 4 floats.
	w1, err := q.Tensor(2, 1)
	if err != nil || w1 != (TensorInfo{Name: "w1", Stored: DTypeF8E4M3, Held: DTypeF8E4M3, Numel: 16384,
		Bytes: 16384 + 8*4*4}) {
		t.Fatalf("Tensor(2, 1) = %+v, %v", w1, err)
	}
	if n, err := q.NumTensors(2); err != nil || n != 8 {
		t.Fatalf("NumTensors(2) = %d, %v", n, err)
	}
	gate, err := q.Tensor(2, 0)
	if err != nil || gate.Name != "gate" || gate.Held != DTypeF32 || gate.Bytes != 4*gate.Numel {
		t.Fatalf("Tensor(2, 0) = %+v, %v", gate, err)
	}
	after, err := q.ResidentBytes()
	if err != nil || after >= before/3 {
		t.Fatalf("ResidentBytes() after = %d (before %d), %v", after, before, err)
	}
	path := filepath.Join(t.TempDir(), "fp8.moert")
	if err := q.Save(path); err != nil {
		t.Fatal(err)
	}
	r, err := LoadModel(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if b, err := r.ResidentBytes(); err != nil || b != after {
		t.Fatalf("reloaded ResidentBytes() = %d, %v; want %d", b, err, after)
	}
	_, err = q.Tensor(2, 8)
	wantCode(t, err, ErrInvalidArgument)
	p2, _, err := m.QuantizeFP8(true)
	if err != nil {
		t.Fatal(err)
	}
	p2.Close()
}

// A step made and counted before it fails (weight decay takes moe0.w1 past the fp32 range)
// returns its figures with the error; one refused before any change returns NaN.
func TestStepMadeBeforeItFailedReturnsItsFigures(t *testing.T) {
	s := mustSession(t, mustModel(t), ModeTraining, 1)
	if err := s.SetEval(true); err != nil {
		t.Fatal(err)
	}
	lr, norm, err := s.Step()
	wantCode(t, err, ErrInvalidState)
	if !math.IsNaN(lr) || !math.IsNaN(norm) {
		t.Fatalf("a refused step returned lr %v, grad norm %v", lr, norm)
	}
	if err := s.SetEval(false); err != nil {
		t.Fatal(err)
	}
	for _, kv := range [][2]string{{"lr", "1"}, {"weight_decay", "3"}} {
		if err := s.SetConfig(kv[0], kv[1]); err != nil {
			t.Fatal(err)
		}
	}
	ids := batch(16, 4, 0)
	if _, err := s.ForwardTokens(ids, 16); err != nil {
		t.Fatal(err)
	}
	if _, err := s.BackwardLoss(make([]int32, 16)); err != nil {
		t.Fatal(err)
	}
	w1, err := s.GetParameter("moe0.w1")
	if err != nil {
		t.Fatal(err)
	}
	for i := range w1 {
		w1[i] = 3e38
	}
	if err := s.SetParameter("moe0.w1", w1); err != nil {
		t.Fatal(err)
	}
	lr, norm, err = s.Step()
	wantCode(t, err, ErrNumeric)
	if lr != 1 || !(norm > 0) || math.IsInf(norm, 0) {
		t.Fatalf("the step made returned lr %v, grad norm %v", lr, norm)
	}
	if n, _ := s.StepCount(); n != 1 {
		t.Fatalf("step count %d after a step made", n)
	}
}

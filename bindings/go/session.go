package moert

import (
	"fmt"
	"math"
	"runtime"
	"sort"
	"sync"
	"time"

	"moert.dev/moert/internal/capi"
)

// Session runs a model: forward passes, and in training mode backward passes, optimizer steps
// and checkpoints. Any number of goroutines may call one Session at once; the library serialises
// the calls (moert.h), so sharing one Session is the way to serve a model from many goroutines.
type Session struct {
	g   guard
	ptr capi.Struct_SS_moert_session

	io      IO
	experts map[int]int // MoE layer index -> routed experts, read from the model at creation

	paramsOnce sync.Once
	params     map[string]uint64 // parameter name -> element count (training sessions)
	paramsErr  error
}

// NewSession creates a session over model with opts (nil: defaults). The session keeps what it
// needs of the model, which may be closed afterwards.
func NewSession(model *Model, opts *SessionOptions) (*Session, error) {
	if model == nil {
		return nil, &Error{Code: ErrInvalidArgument, Message: "model is nil"}
	}
	if abiErr != nil {
		return nil, abiErr
	}
	io, err := model.IO()
	if err != nil {
		return nil, err
	}
	layers, err := model.Layers()
	if err != nil {
		return nil, err
	}
	experts := map[int]int{}
	for _, l := range layers {
		if l.Kind == LayerMoE {
			n, err := model.MoEInt(l.Index, MoENumExperts)
			if err != nil {
				return nil, err
			}
			experts[l.Index] = int(n)
		}
	}

	if err := model.g.enter(); err != nil {
		return nil, err
	}
	defer model.g.leave()
	var optsPtr capi.Struct_SS_moert_session_options = capi.SwigcptrStruct_SS_moert_session_options(0)
	if opts != nil {
		if err := opts.g.enter(); err != nil {
			return nil, err
		}
		defer opts.g.leave()
		optsPtr = opts.ptr
	}
	var p uintptr
	if err := check(capi.Moert_session_create(model.ptr, optsPtr, &p)); err != nil {
		return nil, err
	}
	s := &Session{g: guard{what: "session"}, ptr: capi.SwigcptrStruct_SS_moert_session(p),
		io: io, experts: experts}
	runtime.SetFinalizer(s, (*Session).Close)
	return s, nil
}

// Close releases the session after the calls in flight have finished; a second Close does
// nothing.
func (s *Session) Close() error {
	if s == nil {
		return nil
	}
	s.g.close(func() {
		capi.Moert_session_free(s.ptr)
		runtime.SetFinalizer(s, nil)
	})
	return nil
}

// IO is what the session's forward pass takes and returns.
func (s *Session) IO() IO { return s.io }

// call runs one C call under the session's guard and converts its status.
func (s *Session) call(f func() capi.Struct_SS_moert_status) error {
	if err := s.g.enter(); err != nil {
		return err
	}
	defer s.g.leave()
	return check(f())
}

// ForwardTokens runs a forward pass over rows rows of token ids (tokens holds rows*InputWidth
// ids, row-major) and returns rows*OutputWidth outputs.
func (s *Session) ForwardTokens(tokens []int32, rows int) ([]float32, error) {
	out := s.io.outputs(rows, len(tokens))
	in := ownInts(tokens)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_tokens(s.ptr, in, forwardRows(rows), out)
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// ForwardTokensInto is ForwardTokens writing into out (rows*OutputWidth values). tokens and out
// may lie in any Go memory (see memory.go); out is written only on success.
func (s *Session) ForwardTokensInto(tokens []int32, rows int, out []float32) error {
	in, dst := ownInts(tokens), scratchFloats(out)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_tokens(s.ptr, in, forwardRows(rows), dst)
	}); err != nil {
		return err
	}
	copy(out, dst)
	return nil
}

// ForwardHidden runs a forward pass over rows rows of hidden states (in holds rows*InputWidth
// values) and returns rows*OutputWidth outputs.
func (s *Session) ForwardHidden(in []float32, rows int) ([]float32, error) {
	out := s.io.outputs(rows, len(in))
	src := ownFloats(in)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_hidden(s.ptr, src, forwardRows(rows), out)
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// ForwardHiddenInto is ForwardHidden writing into out (rows*OutputWidth values). in and out may
// lie in any Go memory (see memory.go); out is written only on success.
func (s *Session) ForwardHiddenInto(in []float32, rows int, out []float32) error {
	src, dst := ownFloats(in), scratchFloats(out)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_hidden(s.ptr, src, forwardRows(rows), dst)
	}); err != nil {
		return err
	}
	copy(out, dst)
	return nil
}

// ForwardTokensMasked is ForwardTokens over a padded batch: mask holds one value per row, true
// for a row that takes part and false for padding. A padding row's ids are not read (a pad id
// outside the vocabulary is fine); the row is not routed, counted or balanced, its output row
// is zero, and it takes no part in Backward or BackwardLoss. The other rows get exactly the
// outputs of a pass over them alone. A mask of another length than rows is an error.
func (s *Session) ForwardTokensMasked(tokens []int32, mask []bool, rows int) ([]float32, error) {
	out := s.io.outputs(rows, len(tokens))
	in, m := ownInts(tokens), ownMask(mask)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_tokens_masked(s.ptr, in, m, forwardRows(rows), out)
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// ForwardTokensMaskedInto is ForwardTokensMasked writing into out (rows*OutputWidth values).
// tokens, mask and out may lie in any Go memory (see memory.go); out is written only on success.
func (s *Session) ForwardTokensMaskedInto(tokens []int32, mask []bool, rows int, out []float32) error {
	in, m, dst := ownInts(tokens), ownMask(mask), scratchFloats(out)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_tokens_masked(s.ptr, in, m, forwardRows(rows), dst)
	}); err != nil {
		return err
	}
	copy(out, dst)
	return nil
}

// ForwardHiddenMasked is ForwardHidden over a padded batch, with mask as for
// ForwardTokensMasked: a padding row's values are not read (NaN or garbage is fine) and its
// output row is zero; the input gradient Backward gives it is zero.
func (s *Session) ForwardHiddenMasked(in []float32, mask []bool, rows int) ([]float32, error) {
	out := s.io.outputs(rows, len(in))
	src, m := ownFloats(in), ownMask(mask)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_hidden_masked(s.ptr, src, m, forwardRows(rows), out)
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// ForwardHiddenMaskedInto is ForwardHiddenMasked writing into out (rows*OutputWidth values). in,
// mask and out may lie in any Go memory (see memory.go); out is written only on success.
func (s *Session) ForwardHiddenMaskedInto(in []float32, mask []bool, rows int, out []float32) error {
	src, m, dst := ownFloats(in), ownMask(mask), scratchFloats(out)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_forward_hidden_masked(s.ptr, src, m, forwardRows(rows), dst)
	}); err != nil {
		return err
	}
	copy(out, dst)
	return nil
}

// numExperts is the routed expert count of MoE layer l.
func (s *Session) numExperts(l int) (uint32, int, error) {
	n, ok := s.experts[l]
	if !ok {
		moe := make([]int, 0, len(s.experts))
		for k := range s.experts {
			moe = append(moe, k)
		}
		sort.Ints(moe)
		return 0, 0, &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf(
			"layer %d is not a MoE layer (the model's MoE layers: %v)", l, moe)}
	}
	idx, err := index32("layer index", l)
	return idx, n, err
}

// ExpertCounts is the number of tokens routed to each expert of MoE layer l in scope.
func (s *Session) ExpertCounts(l int, scope Scope) ([]int64, error) {
	idx, n, err := s.numExperts(l)
	if err != nil {
		return nil, err
	}
	counts := make([]int64, n)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_expert_counts(s.ptr, idx, int32(scope), counts)
	}); err != nil {
		return nil, err
	}
	return counts, nil
}

// MaxVio is (max count - mean count) / mean count of MoE layer l in scope, or the mean over all
// MoE layers with AllLayers; 0 when nothing was counted.
func (s *Session) MaxVio(l int, scope Scope) (float64, error) {
	idx, err := index32("layer index", l)
	if err != nil {
		return 0, err
	}
	var v float64
	err = s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_max_vio(s.ptr, idx, int32(scope), &v)
	})
	return v, err
}

// Profile is where the time of a session over several ranks goes (SessionOptions.SetCommunicator),
// summed over its MoE layers' passes since its creation or the last ResetMetrics. The waits are
// the communication that computation did not hide: compare with a session created with
// "ep_overlap" "false" to see what overlap hides. All zero for a session alone.
type Profile struct {
	Dispatch  time.Duration // waiting for tokens (and output gradients) to arrive
	Combine   time.Duration // waiting for the experts' results to come back
	Experts   time.Duration // computing this rank's routed experts
	Gradients time.Duration // combining gradients across ranks after each backward
}

// ProfileFigures is the number of figures the library's profile holds (MOERT_PROFILE_COUNT).
const ProfileFigures = int(capi.MOERT_PROFILE_COUNT)

// Profile reads the session's Profile.
func (s *Session) Profile() (Profile, error) {
	seconds := make([]float64, ProfileFigures)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_profile(s.ptr, seconds)
	}); err != nil {
		return Profile{}, err
	}
	at := func(i int) time.Duration { return time.Duration(seconds[i] * float64(time.Second)) }
	return Profile{
		Dispatch:  at(capi.MOERT_PROFILE_DISPATCH),
		Combine:   at(capi.MOERT_PROFILE_COMBINE),
		Experts:   at(capi.MOERT_PROFILE_EXPERTS),
		Gradients: at(capi.MOERT_PROFILE_GRADIENTS),
	}, nil
}

// ResetMetrics zeroes the CountsEval counts of every MoE layer, and the Profile.
func (s *Session) ResetMetrics() error {
	return s.call(func() capi.Struct_SS_moert_status { return capi.Moert_session_reset_metrics(s.ptr) })
}

// BackwardLoss takes the softmax cross-entropy of the last training forward pass's logits
// against targets (one id per row), plus the auxiliary balancing losses, accumulates every
// gradient and returns the loss. The cross-entropy is the mean over the rows that take part (not
// padding of a masked pass) whose target is not IgnoreTarget.
func (s *Session) BackwardLoss(targets []int32) (float64, error) {
	var loss float64
	t := ownInts(targets)
	err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_backward_loss(s.ptr, t, &loss)
	})
	return loss, err
}

// Backward back-propagates gradOut (the gradient of the last training forward pass's outputs)
// and returns the auxiliary balancing loss. gradIn, when not nil, receives the gradient of the
// inputs (hidden-state models only).
func (s *Session) Backward(gradOut, gradIn []float32) (auxLoss float64, err error) {
	src, dst := ownFloats(gradOut), scratchFloats(gradIn)
	err = s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_backward(s.ptr, src, dst, &auxLoss)
	})
	if err == nil {
		copy(gradIn, dst)
	}
	return auxLoss, err
}

// ZeroGrad zeroes the accumulated gradients and the micro-batch count.
func (s *Session) ZeroGrad() error {
	return s.call(func() capi.Struct_SS_moert_status { return capi.Moert_session_zero_grad(s.ptr) })
}

// Step takes one optimizer step over the accumulated gradients, then updates the loss-free
// balancing bias. It returns the learning rate used and the gradient norm before clipping. With
// an error they are NaN, unless the step was made and counted before the call failed (an update
// that took a parameter past the fp32 range, ErrNumeric; a weight copy that could not be made;
// another rank's failure after the update): then they are that step's.
func (s *Session) Step() (lr, gradNorm float64, err error) {
	// moert.h writes both only for a step that was made.
	lr, gradNorm = math.NaN(), math.NaN()
	err = s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_step(s.ptr, &lr, &gradNorm)
	})
	return lr, gradNorm, err
}

// StepCount is the number of optimizer steps taken (restored by Load).
func (s *Session) StepCount() (uint64, error) {
	var n uint64
	err := s.call(func() capi.Struct_SS_moert_status { return capi.Moert_session_step_count(s.ptr, &n) })
	return n, err
}

// SetEval switches a training session to evaluation (true) or back to training (false).
func (s *Session) SetEval(eval bool) error {
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_eval(s.ptr, flag(eval))
	})
}

// SetConfig sets a knob by name (see moert.h) for this session from now on; training knobs
// need a training session.
func (s *Session) SetConfig(key, value string) error {
	if err := noNUL("config key or value", key+value); err != nil {
		return err
	}
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_config(s.ptr, key, value)
	})
}

// ParameterInfo names a trainable parameter tensor.
type ParameterInfo struct {
	Name  string // "<layer name>.<tensor>", e.g. "moe0.w1"
	Numel uint64
}

// NumParameters is the number of trainable parameter tensors.
func (s *Session) NumParameters() (int, error) {
	var n uint32
	err := s.call(func() capi.Struct_SS_moert_status { return capi.Moert_session_num_parameters(s.ptr, &n) })
	return int(n), err
}

// Parameter describes trainable parameter i.
func (s *Session) Parameter(i int) (ParameterInfo, error) {
	idx, err := index32("parameter index", i)
	if err != nil {
		return ParameterInfo{}, err
	}
	var info ParameterInfo
	err = s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_parameter_info(s.ptr, idx, &info.Name, &info.Numel)
	})
	return info, err
}

// Parameters describes every trainable parameter.
func (s *Session) Parameters() ([]ParameterInfo, error) {
	n, err := s.NumParameters()
	if err != nil {
		return nil, err
	}
	infos := make([]ParameterInfo, n)
	for i := range infos {
		if infos[i], err = s.Parameter(i); err != nil {
			return nil, err
		}
	}
	return infos, nil
}

// numel is the element count of parameter name.
func (s *Session) numel(name string) (int, error) {
	s.paramsOnce.Do(func() {
		infos, err := s.Parameters()
		if err != nil {
			s.paramsErr = err
			return
		}
		s.params = make(map[string]uint64, len(infos))
		for _, p := range infos {
			s.params[p.Name] = p.Numel
		}
	})
	if s.paramsErr != nil {
		return 0, s.paramsErr
	}
	n, ok := s.params[name]
	if !ok {
		return 0, &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf("no parameter named %q", name)}
	}
	return int(n), nil
}

func (s *Session) readTensor(name string, read func(name string, out []float32) capi.Struct_SS_moert_status) ([]float32, error) {
	if err := noNUL("parameter name", name); err != nil {
		return nil, err
	}
	n, err := s.numel(name)
	if err != nil {
		return nil, err
	}
	out := make([]float32, n)
	if err := s.call(func() capi.Struct_SS_moert_status { return read(name, out) }); err != nil {
		return nil, err
	}
	return out, nil
}

// GetParameter copies parameter name (row-major) out.
func (s *Session) GetParameter(name string) ([]float32, error) {
	return s.readTensor(name, func(n string, out []float32) capi.Struct_SS_moert_status {
		return capi.Moert_session_get_parameter(s.ptr, n, out)
	})
}

// SetParameter copies values into parameter name; NaN or infinity is refused.
func (s *Session) SetParameter(name string, values []float32) error {
	if err := noNUL("parameter name", name); err != nil {
		return err
	}
	v := ownFloats(values)
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_parameter(s.ptr, name, v)
	})
}

// GetGradient copies the accumulated gradient of parameter name out.
func (s *Session) GetGradient(name string) ([]float32, error) {
	return s.readTensor(name, func(n string, out []float32) capi.Struct_SS_moert_status {
		return capi.Moert_session_get_gradient(s.ptr, n, out)
	})
}

// SetGradient copies values into the accumulated gradient of parameter name.
func (s *Session) SetGradient(name string, values []float32) error {
	if err := noNUL("parameter name", name); err != nil {
		return err
	}
	v := ownFloats(values)
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_gradient(s.ptr, name, v)
	})
}

// ExpertBias is the loss-free balancing bias (one value per routed expert) of MoE layer l.
func (s *Session) ExpertBias(l int) ([]float32, error) {
	idx, n, err := s.numExperts(l)
	if err != nil {
		return nil, err
	}
	bias := make([]float32, n)
	if err := s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_get_expert_bias(s.ptr, idx, bias)
	}); err != nil {
		return nil, err
	}
	return bias, nil
}

// SetExpertBias sets the loss-free balancing bias of MoE layer l.
func (s *Session) SetExpertBias(l int, bias []float32) error {
	idx, err := index32("layer index", l)
	if err != nil {
		return err
	}
	b := ownFloats(bias)
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_expert_bias(s.ptr, idx, b)
	})
}

// SetBiasUpdateRate sets gamma (>= 0; 0 stops updates) of MoE layer l or AllLayers from the
// next step on.
func (s *Session) SetBiasUpdateRate(l int, gamma float64) error {
	idx, err := index32("layer index", l)
	if err != nil {
		return err
	}
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_bias_update_rate(s.ptr, idx, gamma)
	})
}

// SetBiasFrozen freezes or thaws the bias of MoE layer l or AllLayers.
func (s *Session) SetBiasFrozen(l int, frozen bool) error {
	idx, err := index32("layer index", l)
	if err != nil {
		return err
	}
	return s.call(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_set_bias_frozen(s.ptr, idx, flag(frozen))
	})
}

// Save writes a checkpoint atomically; on failure (ErrIO) the previous file at path is intact.
func (s *Session) Save(path string) error {
	if err := noNUL("path", path); err != nil {
		return err
	}
	return s.call(func() capi.Struct_SS_moert_status { return capi.Moert_session_save(s.ptr, path) })
}

// Load restores a checkpoint written by Save for the same architecture; a corrupt, truncated or
// foreign file is refused and the session keeps its state.
func (s *Session) Load(path string) error {
	if err := noNUL("path", path); err != nil {
		return err
	}
	return s.call(func() capi.Struct_SS_moert_status { return capi.Moert_session_load(s.ptr, path) })
}

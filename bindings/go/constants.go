package moert

import (
	"fmt"

	"moert.dev/moert/internal/capi"
)

// LayerKind is the kind of a model layer (MOERT_LAYER_*).
type LayerKind int32

// Layer kinds.
const (
	LayerEmbedding  LayerKind = LayerKind(capi.MOERT_LAYER_EMBEDDING)
	LayerRMSNorm    LayerKind = LayerKind(capi.MOERT_LAYER_RMSNORM)
	LayerMoE        LayerKind = LayerKind(capi.MOERT_LAYER_MOE)
	LayerDenseFFN   LayerKind = LayerKind(capi.MOERT_LAYER_DENSE_FFN)
	LayerOutputHead LayerKind = LayerKind(capi.MOERT_LAYER_OUTPUT_HEAD)
)

// InputKind is what a model's forward pass takes (MOERT_INPUT_*).
type InputKind int32

// Input kinds.
const (
	InputTokens InputKind = InputKind(capi.MOERT_INPUT_TOKENS)
	InputHidden InputKind = InputKind(capi.MOERT_INPUT_HIDDEN)
)

// MoEKey names a setting of a MoE layer (MOERT_MOE_*): integer keys for Model.MoEInt, floating
// ones for Model.MoEFloat.
type MoEKey int32

// MoE layer settings.
const (
	MoEDim              MoEKey = MoEKey(capi.MOERT_MOE_DIM)
	MoENumExperts       MoEKey = MoEKey(capi.MOERT_MOE_NUM_EXPERTS)
	MoETopK             MoEKey = MoEKey(capi.MOERT_MOE_TOP_K)
	MoEExpertHidden     MoEKey = MoEKey(capi.MOERT_MOE_EXPERT_HIDDEN)
	MoEScoreFunction    MoEKey = MoEKey(capi.MOERT_MOE_SCORE_FUNCTION)
	MoENumGroups        MoEKey = MoEKey(capi.MOERT_MOE_NUM_GROUPS)
	MoETopKGroups       MoEKey = MoEKey(capi.MOERT_MOE_TOPK_GROUPS)
	MoENormalizeWeights MoEKey = MoEKey(capi.MOERT_MOE_NORMALIZE_WEIGHTS)
	MoENumSharedExperts MoEKey = MoEKey(capi.MOERT_MOE_NUM_SHARED_EXPERTS)
	MoESharedHidden     MoEKey = MoEKey(capi.MOERT_MOE_SHARED_HIDDEN)
	MoEResidual         MoEKey = MoEKey(capi.MOERT_MOE_RESIDUAL)
	MoEBalancingPolicy  MoEKey = MoEKey(capi.MOERT_MOE_BALANCING_POLICY)
	MoEBiasCentering    MoEKey = MoEKey(capi.MOERT_MOE_BIAS_CENTERING)
	MoEBiasFrozen       MoEKey = MoEKey(capi.MOERT_MOE_BIAS_FROZEN)
	// A checkpoint's freeze and update rate as saved (see Model.CheckpointStep).
	MoESavedBiasFrozen     MoEKey = MoEKey(capi.MOERT_MOE_SAVED_BIAS_FROZEN)
	MoESavedBiasUpdateRate MoEKey = MoEKey(capi.MOERT_MOE_SAVED_BIAS_UPDATE_RATE)
	MoERoutedScaling       MoEKey = MoEKey(capi.MOERT_MOE_ROUTED_SCALING_FACTOR)
	MoEBiasUpdateRate      MoEKey = MoEKey(capi.MOERT_MOE_BIAS_UPDATE_RATE)
	MoEAuxAlpha            MoEKey = MoEKey(capi.MOERT_MOE_AUX_ALPHA)
	MoECapacityFactor      MoEKey = MoEKey(capi.MOERT_MOE_CAPACITY_FACTOR)
)

// Values of MoEScoreFunction, as Model.MoEInt returns them.
const (
	ScoreSigmoid int64 = int64(capi.MOERT_SCORE_SIGMOID)
	ScoreSoftmax int64 = int64(capi.MOERT_SCORE_SOFTMAX)
)

// Values of MoEBalancingPolicy, as Model.MoEInt returns them.
const (
	BalancingNone            int64 = int64(capi.MOERT_BALANCING_NONE)
	BalancingLossFreeBias    int64 = int64(capi.MOERT_BALANCING_LOSS_FREE_BIAS)
	BalancingAuxLoss         int64 = int64(capi.MOERT_BALANCING_AUX_LOSS)
	BalancingSequenceAuxLoss int64 = int64(capi.MOERT_BALANCING_SEQUENCE_AUX_LOSS)
	BalancingExpertChoice    int64 = int64(capi.MOERT_BALANCING_EXPERT_CHOICE)
)

// Device is where a session runs (MOERT_DEVICE_*).
type Device int32

// Devices.
const (
	DeviceCPU  Device = Device(capi.MOERT_DEVICE_CPU)
	DeviceCUDA Device = Device(capi.MOERT_DEVICE_CUDA)
)

// Mode is a session's mode (MOERT_MODE_*).
type Mode int32

// Modes.
const (
	ModeInference Mode = Mode(capi.MOERT_MODE_INFERENCE)
	ModeTraining  Mode = Mode(capi.MOERT_MODE_TRAINING)
)

// Scope selects which token counts a metrics call reads (MOERT_COUNTS_*).
type Scope int32

// Scopes.
const (
	CountsLast Scope = Scope(capi.MOERT_COUNTS_LAST) // the last forward pass (MaxVio_batch)
	CountsStep Scope = Scope(capi.MOERT_COUNTS_STEP) // training passes since the last optimizer step
	CountsEval Scope = Scope(capi.MOERT_COUNTS_EVAL) // eval passes since ResetMetrics (MaxVio_global)
)

// AllLayers selects every MoE layer where a method takes a layer index and says so.
const AllLayers int = int(capi.MOERT_ALL_LAYERS)

// IgnoreTarget is a target that takes no part in BackwardLoss's loss (PyTorch's ignore_index).
// moert.h defines it in parentheses, which SWIG hands over as a run-time value, not a Go
// constant; this package states it as a constant and checks it against the header's at load.
const IgnoreTarget int32 = -100

func init() {
	if int(IgnoreTarget) != capi.MOERT_IGNORE_TARGET && abiErr == nil {
		abiErr = &Error{Code: ErrUnsupported, Message: fmt.Sprintf(
			"moert.h defines MOERT_IGNORE_TARGET as %d, this package as %d",
			capi.MOERT_IGNORE_TARGET, IgnoreTarget)}
	}
}

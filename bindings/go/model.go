package moert

import (
	"runtime"

	"moert.dev/moert/internal/capi"
)

// Model is a loaded, validated model description. It is immutable and may be used from any
// number of goroutines. Sessions created from it stay valid after it is closed.
type Model struct {
	g   guard
	ptr capi.Struct_SS_moert_model
}

// LayerInfo describes one layer of a model.
type LayerInfo struct {
	Index    int
	Kind     LayerKind
	Name     string // "layer<index>" when the file names none
	InWidth  int    // values per input row; an embedding's context window in tokens
	OutWidth int    // values per output row
}

// IO is what a model's forward pass takes and returns.
type IO struct {
	Input       InputKind
	InputWidth  int // values per input row (token ids or hidden values)
	OutputWidth int // values per output row
}

// outputs allocates the rows*OutputWidth outputs of a forward pass over rows rows whose input
// holds n values. Where rows does not fit the input (or exceeds 2^31 - 1) it allocates none and
// the call goes on: the library refuses it, naming the input, on every rank of a session among
// ranks (a rank that refused alone would leave the others waiting) and counted by a batcher; no
// wrong count becomes an allocation that ends the process.
func (io IO) outputs(rows, n int) []float32 {
	if rows < 0 || rows > 1<<31-1 || rows*io.InputWidth != n {
		return []float32{}
	}
	return make([]float32, rows*io.OutputWidth)
}

// forwardRows is the row count a forward call passes to the C ABI, which cannot take a negative
// one: that goes as 0, which the library refuses (before it looks at a nil slice, Go's empty one)
// alike on every rank of a session among ranks and counts in a batcher, as any other bad count.
func forwardRows(rows int) uint64 {
	if rows < 0 {
		return 0
	}
	return uint64(rows)
}

func newModel(p uintptr) *Model {
	m := &Model{g: guard{what: "model"}, ptr: capi.SwigcptrStruct_SS_moert_model(p)}
	runtime.SetFinalizer(m, (*Model).Close)
	return m
}

// LoadModel loads and validates a binary model file. External weights are read relative to the
// file's directory. A malformed file gives an *Error with ErrInvalidModel naming the layer and
// field at fault; an unreadable one ErrIO.
func LoadModel(path string) (*Model, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	if err := noNUL("path", path); err != nil {
		return nil, err
	}
	var p uintptr
	if err := check(capi.Moert_model_load_file(path, &p)); err != nil {
		return nil, err
	}
	return newModel(p), nil
}

// LoadModelBytes loads a model from memory (copied: data may lie in any Go memory, see
// memory.go). externalDir is the directory a model with
// external weights resolves its data file against; "" when it has none.
func LoadModelBytes(data []byte, externalDir string) (*Model, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	if err := noNUL("external directory", externalDir); err != nil {
		return nil, err
	}
	var p uintptr
	if err := check(capi.Moert_model_load_buffer(ownBytes(data), externalDir, &p)); err != nil {
		return nil, err
	}
	return newModel(p), nil
}

// Close releases the model. It waits for calls in flight; a second Close does nothing.
func (m *Model) Close() error {
	if m == nil {
		return nil
	}
	m.g.close(func() {
		capi.Moert_model_free(m.ptr)
		runtime.SetFinalizer(m, nil)
	})
	return nil
}

// Name is the model's name ("" when it has none).
func (m *Model) Name() (string, error) {
	if err := m.g.enter(); err != nil {
		return "", err
	}
	defer m.g.leave()
	var name string
	if err := check(capi.Moert_model_name(m.ptr, &name)); err != nil {
		return "", err
	}
	return name, nil
}

// NumLayers is the number of layers.
func (m *Model) NumLayers() (int, error) {
	if err := m.g.enter(); err != nil {
		return 0, err
	}
	defer m.g.leave()
	var n uint32
	if err := check(capi.Moert_model_num_layers(m.ptr, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Layer describes layer i.
func (m *Model) Layer(i int) (LayerInfo, error) {
	idx, err := index32("layer index", i)
	if err != nil {
		return LayerInfo{}, err
	}
	if err := m.g.enter(); err != nil {
		return LayerInfo{}, err
	}
	defer m.g.leave()
	var kind int32
	var name string
	var in, out uint32
	if err := check(capi.Moert_model_layer_kind(m.ptr, idx, &kind)); err != nil {
		return LayerInfo{}, err
	}
	if err := check(capi.Moert_model_layer_name(m.ptr, idx, &name)); err != nil {
		return LayerInfo{}, err
	}
	if err := check(capi.Moert_model_layer_dims(m.ptr, idx, &in, &out)); err != nil {
		return LayerInfo{}, err
	}
	return LayerInfo{Index: i, Kind: LayerKind(kind), Name: name, InWidth: int(in), OutWidth: int(out)}, nil
}

// Layers describes every layer.
func (m *Model) Layers() ([]LayerInfo, error) {
	n, err := m.NumLayers()
	if err != nil {
		return nil, err
	}
	layers := make([]LayerInfo, n)
	for i := range layers {
		if layers[i], err = m.Layer(i); err != nil {
			return nil, err
		}
	}
	return layers, nil
}

// IO is what a forward pass takes and returns.
func (m *Model) IO() (IO, error) {
	if err := m.g.enter(); err != nil {
		return IO{}, err
	}
	defer m.g.leave()
	var kind int32
	var in, out uint32
	if err := check(capi.Moert_model_io(m.ptr, &kind, &in, &out)); err != nil {
		return IO{}, err
	}
	return IO{Input: InputKind(kind), InputWidth: int(in), OutputWidth: int(out)}, nil
}

// VocabSize is the number of token ids a token model accepts (ids 0 to VocabSize-1); an error
// for a model that takes hidden states.
func (m *Model) VocabSize() (int, error) {
	if err := m.g.enter(); err != nil {
		return 0, err
	}
	defer m.g.leave()
	var n uint32
	if err := check(capi.Moert_model_vocab_size(m.ptr, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// NumParameters counts every parameter (total) and those one input row uses (activated).
func (m *Model) NumParameters() (total, activated uint64, err error) {
	if err := m.g.enter(); err != nil {
		return 0, 0, err
	}
	defer m.g.leave()
	err = check(capi.Moert_model_num_parameters(m.ptr, &total, &activated))
	return total, activated, err
}

// MoEInt reads an integer setting of MoE layer i.
func (m *Model) MoEInt(i int, key MoEKey) (int64, error) {
	idx, err := index32("layer index", i)
	if err != nil {
		return 0, err
	}
	if err := m.g.enter(); err != nil {
		return 0, err
	}
	defer m.g.leave()
	var v int64
	if err := check(capi.Moert_model_moe_int(m.ptr, idx, int32(key), &v)); err != nil {
		return 0, err
	}
	return v, nil
}

// MoEFloat reads a floating-point setting of MoE layer i.
func (m *Model) MoEFloat(i int, key MoEKey) (float64, error) {
	idx, err := index32("layer index", i)
	if err != nil {
		return 0, err
	}
	if err := m.g.enter(); err != nil {
		return 0, err
	}
	defer m.g.leave()
	var v float64
	if err := check(capi.Moert_model_moe_float(m.ptr, idx, int32(key), &v)); err != nil {
		return 0, err
	}
	return v, nil
}

// DType is an element type of weights (MOERT_DTYPE_*).
type DType int32

// Element types of weights.
const (
	DTypeF32    DType = DType(capi.MOERT_DTYPE_F32)
	DTypeBF16   DType = DType(capi.MOERT_DTYPE_BF16)
	DTypeF8E4M3 DType = DType(capi.MOERT_DTYPE_F8E4M3) // FP8 E4M3 codes, one fp32 scale per block
)

// TensorInfo is one weight tensor of a layer as the loaded model holds it.
type TensorInfo struct {
	Name   string // the schema's field name: "w1", "gate_bias"
	Stored DType  // the element type the file stored it in
	Held   DType  // in memory: F8E4M3 for FP8 in 128x128 blocks, F32 for every other
	Numel  uint64
	Bytes  uint64 // in memory as held (an FP8 tensor's block scales included)
}

// NumTensors is the number of weight tensors of layer i (absent optional ones not counted).
func (m *Model) NumTensors(i int) (int, error) {
	idx, err := index32("layer index", i)
	if err != nil {
		return 0, err
	}
	if err := m.g.enter(); err != nil {
		return 0, err
	}
	defer m.g.leave()
	var n uint32
	if err := check(capi.Moert_model_num_tensors(m.ptr, idx, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Tensor describes weight tensor t of layer i as the model holds it.
func (m *Model) Tensor(i, t int) (TensorInfo, error) {
	idx, err := index32("layer index", i)
	if err != nil {
		return TensorInfo{}, err
	}
	tidx, err := index32("tensor index", t)
	if err != nil {
		return TensorInfo{}, err
	}
	if err := m.g.enter(); err != nil {
		return TensorInfo{}, err
	}
	defer m.g.leave()
	var info TensorInfo
	var stored, held int32
	if err := check(capi.Moert_model_tensor_info(m.ptr, idx, tidx, &info.Name, &stored, &held,
		&info.Numel, &info.Bytes)); err != nil {
		return TensorInfo{}, err
	}
	info.Stored, info.Held = DType(stored), DType(held)
	return info, nil
}

// ResidentBytes is the bytes the model's weights take in memory as held.
func (m *Model) ResidentBytes() (uint64, error) {
	if err := m.g.enter(); err != nil {
		return 0, err
	}
	defer m.g.leave()
	var n uint64
	err := check(capi.Moert_model_resident_bytes(m.ptr, &n))
	return n, err
}

// CheckpointStep reports whether the model was loaded from a checkpoint (whose training state
// loading verified, then dropped; Session.Load resumes it) and the optimizer steps its run had
// taken. Model.MoEInt and Model.MoEFloat read the balancing state it saved with
// MoESavedBiasFrozen and MoESavedBiasUpdateRate.
func (m *Model) CheckpointStep() (isCheckpoint bool, step uint64, err error) {
	if err := m.g.enter(); err != nil {
		return false, 0, err
	}
	defer m.g.leave()
	var is int32
	err = check(capi.Moert_model_checkpoint_step(m.ptr, &is, &step))
	return is != 0, step, err
}

// QuantizeFP8 returns a new model whose MoE layers' routed and shared expert weights are FP8
// E4M3 in 128x128 blocks (scales rounded up to powers of two with powerOfTwoScales), and the
// number of tensors quantized (0 for a model without MoE layers). The caller closes the new model.
func (m *Model) QuantizeFP8(powerOfTwoScales bool) (*Model, int, error) {
	if err := m.g.enter(); err != nil {
		return nil, 0, err
	}
	defer m.g.leave()
	var flags uint32
	if powerOfTwoScales {
		flags = uint32(capi.MOERT_FP8_POWER_OF_TWO_SCALES)
	}
	var p uintptr
	var quantized uint32
	if err := check(capi.Moert_model_quantize_fp8(m.ptr, flags, &p, &quantized)); err != nil {
		return nil, 0, err
	}
	return newModel(p), int(quantized), nil
}

// Save writes the model as a binary model file at path, atomically; weights as held (FP8
// tensors as FP8 with their block scales).
func (m *Model) Save(path string) error {
	if err := noNUL("path", path); err != nil {
		return err
	}
	if err := m.g.enter(); err != nil {
		return err
	}
	defer m.g.leave()
	return check(capi.Moert_model_save_file(m.ptr, path))
}

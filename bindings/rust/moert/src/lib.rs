//! Safe Rust API of moert, an embeddable Mixture-of-Experts runtime, over `moert-sys`.
//!
//! Every fallible call returns [`Result`]; an [`Error`] carries the library's status [`Code`]
//! and message. [`Model`], [`SessionOptions`] and [`Session`] own C handles and free them on
//! `Drop`. Strings the library owns are copied into `String`s before a call returns.
//!
//! Thread-safety is what `moert.h` documents, no more: a [`Model`] is immutable and may be used
//! from any number of threads (`Send + Sync`); a [`Session`] may be called from any thread and
//! serialises its calls itself (`Send + Sync`, every method takes `&self`, so an
//! `Arc<Session>` serves many threads); [`SessionOptions`] must not be modified concurrently
//! (`Send`, not `Sync`):
//!
//! ```compile_fail,E0277
//! fn shared<T: Sync>() {}
//! shared::<moert::SessionOptions>();
//! ```
//!
//! The first constructor called checks that the loaded libmoert implements the ABI this crate
//! was generated for; when it does not, every constructor returns [`Code::UNSUPPORTED`].
//!
//! ```no_run
//! let model = moert::Model::load("examples/models/tiny_moe.moert")?;
//! let session = moert::Session::new(&model, None)?;
//! let logits = session.forward_tokens(&[1, 2, 3, 4], 1)?;
//! println!("{} logits, MaxVio {}", logits.len(),
//!          session.max_vio(moert::ALL_LAYERS, moert::Scope::LAST)?);
//! # Ok::<(), moert::Error>(())
//! ```

mod batcher;
pub use batcher::{Answer, Batcher, BatcherCounters, BatcherOptions, Pending, RequestStats};

use moert_sys as sys;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::c_char;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

// ---- Errors ------------------------------------------------------------------------------------

/// A status code (`MOERT_ERR_*`). A newtype rather than an enum, so codes a newer library adds
/// still come through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Code(pub i32);

impl Code {
    pub const OK: Code = Code(sys::MOERT_OK as i32);
    pub const INVALID_ARGUMENT: Code = Code(sys::MOERT_ERR_INVALID_ARGUMENT as i32);
    pub const INVALID_MODEL: Code = Code(sys::MOERT_ERR_INVALID_MODEL as i32);
    pub const IO: Code = Code(sys::MOERT_ERR_IO as i32);
    pub const OUT_OF_MEMORY: Code = Code(sys::MOERT_ERR_OUT_OF_MEMORY as i32);
    pub const UNSUPPORTED: Code = Code(sys::MOERT_ERR_UNSUPPORTED as i32);
    pub const INVALID_STATE: Code = Code(sys::MOERT_ERR_INVALID_STATE as i32);
    pub const NUMERIC: Code = Code(sys::MOERT_ERR_NUMERIC as i32);
    pub const INTERNAL: Code = Code(sys::MOERT_ERR_INTERNAL as i32);

    /// The constant's name, e.g. "MOERT_ERR_IO"; "MOERT_ERR_UNKNOWN" for other values.
    pub fn name(self) -> String {
        // SAFETY: moert_status_code_name accepts any value and returns a constant string.
        copy_string(unsafe { sys::moert_status_code_name(self.0) })
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A failed moert call: the status code and the library's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    code: Code,
    message: String,
    // The learning rate and gradient norm (as bits, so that Error stays Eq) of a step that
    // Session::step made and counted before it failed.
    step_made: Option<(u64, u64)>,
}

impl Error {
    /// An error made on the Rust side of the binding (a closed handle, an unusable argument).
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
            step_made: None,
        }
    }

    /// For an error of [`Session::step`]: the step's figures when it was made and counted
    /// before the call failed (an update that took a parameter past the fp32 range,
    /// [`Code::NUMERIC`]; a weight copy that could not be made; another rank's failure after
    /// the update), so that the caller knows its learning rate; `None` when the step was
    /// refused before any change, and for every other call's error. [`Error`]'s equality
    /// compares these figures too.
    pub fn step_made(&self) -> Option<Step> {
        self.step_made.map(|(lr, norm)| Step {
            learning_rate: f64::from_bits(lr),
            gradient_norm: f64::from_bits(norm),
        })
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The library's message, naming what is at fault.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// The result of a moert call.
pub type Result<T> = std::result::Result<T, Error>;

/// Converts a status into a Result and frees it.
fn check(status: *mut sys::moert_status) -> Result<()> {
    if status.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL status comes from the library and is ours to read and free once; the
    // message is copied before the free.
    unsafe {
        let code = Code(sys::moert_status_code(status));
        let message = copy_string(sys::moert_status_message(status));
        sys::moert_status_free(status);
        Err(Error::new(code, message))
    }
}

/// Copies a library string (NULL as "").
fn copy_string(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: the library returns NUL-terminated strings valid until the owning handle goes;
    // this copies before any handle can.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| {
        Error::new(
            Code::INVALID_ARGUMENT,
            format!("{what} contains a NUL byte"),
        )
    })
}

fn c_path(path: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::new(Code::INVALID_ARGUMENT, "path contains a NUL byte"))
}

fn invalid(message: String) -> Error {
    Error::new(Code::INVALID_ARGUMENT, message)
}

// ---- Versions ----------------------------------------------------------------------------------

/// The ABI major this crate was generated for.
pub const BUILT_ABI_VERSION: u32 = sys::MOERT_ABI_VERSION;
/// The library version this crate was generated for: (major, minor, patch).
pub const BUILT_VERSION: (u32, u32, u32) = (
    sys::MOERT_VERSION_MAJOR,
    sys::MOERT_VERSION_MINOR,
    sys::MOERT_VERSION_PATCH,
);

/// The ABI major of the loaded library.
pub fn abi_version() -> u32 {
    // SAFETY: takes nothing, never fails.
    unsafe { sys::moert_abi_version() }
}

/// The loaded library's version, "MAJOR.MINOR.PATCH".
pub fn version() -> String {
    // SAFETY: returns static storage.
    copy_string(unsafe { sys::moert_version_string() })
}

/// Major and minor of the model-description schema the library reads.
pub fn schema_version() -> (u32, u32) {
    let (mut major, mut minor) = (0u32, 0u32);
    // SAFETY: two valid out-pointers.
    unsafe { sys::moert_schema_version(&mut major, &mut minor) };
    (major, minor)
}

/// Whether the loaded library implements the ABI this crate was generated for (checked once).
pub fn check_abi() -> Result<()> {
    static ABI: OnceLock<Result<()>> = OnceLock::new();
    ABI.get_or_init(|| {
        let got = abi_version();
        if got == BUILT_ABI_VERSION {
            Ok(())
        } else {
            Err(Error::new(
                Code::UNSUPPORTED,
                format!("libmoert implements ABI {got}, this crate was built for ABI {BUILT_ABI_VERSION}"),
            ))
        }
    })
    .clone()
}

// ---- Constants ---------------------------------------------------------------------------------

/// Kind of a model layer (`MOERT_LAYER_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerKind(pub i32);

impl LayerKind {
    pub const EMBEDDING: LayerKind = LayerKind(sys::MOERT_LAYER_EMBEDDING as i32);
    pub const RMSNORM: LayerKind = LayerKind(sys::MOERT_LAYER_RMSNORM as i32);
    pub const MOE: LayerKind = LayerKind(sys::MOERT_LAYER_MOE as i32);
    pub const DENSE_FFN: LayerKind = LayerKind(sys::MOERT_LAYER_DENSE_FFN as i32);
    pub const OUTPUT_HEAD: LayerKind = LayerKind(sys::MOERT_LAYER_OUTPUT_HEAD as i32);
}

/// What a forward pass takes (`MOERT_INPUT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InputKind(pub i32);

impl InputKind {
    pub const TOKENS: InputKind = InputKind(sys::MOERT_INPUT_TOKENS as i32);
    pub const HIDDEN: InputKind = InputKind(sys::MOERT_INPUT_HIDDEN as i32);
}

/// A setting of a MoE layer (`MOERT_MOE_*`): integer keys for [`Model::moe_int`], floating ones
/// for [`Model::moe_float`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MoeKey(pub i32);

impl MoeKey {
    pub const DIM: MoeKey = MoeKey(sys::MOERT_MOE_DIM as i32);
    pub const NUM_EXPERTS: MoeKey = MoeKey(sys::MOERT_MOE_NUM_EXPERTS as i32);
    pub const TOP_K: MoeKey = MoeKey(sys::MOERT_MOE_TOP_K as i32);
    pub const EXPERT_HIDDEN: MoeKey = MoeKey(sys::MOERT_MOE_EXPERT_HIDDEN as i32);
    pub const SCORE_FUNCTION: MoeKey = MoeKey(sys::MOERT_MOE_SCORE_FUNCTION as i32);
    pub const NUM_GROUPS: MoeKey = MoeKey(sys::MOERT_MOE_NUM_GROUPS as i32);
    pub const TOPK_GROUPS: MoeKey = MoeKey(sys::MOERT_MOE_TOPK_GROUPS as i32);
    pub const NORMALIZE_WEIGHTS: MoeKey = MoeKey(sys::MOERT_MOE_NORMALIZE_WEIGHTS as i32);
    pub const NUM_SHARED_EXPERTS: MoeKey = MoeKey(sys::MOERT_MOE_NUM_SHARED_EXPERTS as i32);
    pub const SHARED_HIDDEN: MoeKey = MoeKey(sys::MOERT_MOE_SHARED_HIDDEN as i32);
    pub const RESIDUAL: MoeKey = MoeKey(sys::MOERT_MOE_RESIDUAL as i32);
    pub const BALANCING_POLICY: MoeKey = MoeKey(sys::MOERT_MOE_BALANCING_POLICY as i32);
    pub const BIAS_CENTERING: MoeKey = MoeKey(sys::MOERT_MOE_BIAS_CENTERING as i32);
    pub const BIAS_FROZEN: MoeKey = MoeKey(sys::MOERT_MOE_BIAS_FROZEN as i32);
    /// A checkpoint's freeze as saved (see [`Model::checkpoint_step`]).
    pub const SAVED_BIAS_FROZEN: MoeKey = MoeKey(sys::MOERT_MOE_SAVED_BIAS_FROZEN as i32);
    pub const ROUTED_SCALING_FACTOR: MoeKey = MoeKey(sys::MOERT_MOE_ROUTED_SCALING_FACTOR as i32);
    pub const BIAS_UPDATE_RATE: MoeKey = MoeKey(sys::MOERT_MOE_BIAS_UPDATE_RATE as i32);
    pub const AUX_ALPHA: MoeKey = MoeKey(sys::MOERT_MOE_AUX_ALPHA as i32);
    pub const CAPACITY_FACTOR: MoeKey = MoeKey(sys::MOERT_MOE_CAPACITY_FACTOR as i32);
    /// A checkpoint's loss-free bias update rate as saved (see [`Model::checkpoint_step`]).
    pub const SAVED_BIAS_UPDATE_RATE: MoeKey = MoeKey(sys::MOERT_MOE_SAVED_BIAS_UPDATE_RATE as i32);
}

/// Values of [`MoeKey::SCORE_FUNCTION`] as [`Model::moe_int`] returns them.
pub const SCORE_SIGMOID: i64 = sys::MOERT_SCORE_SIGMOID as i64;
pub const SCORE_SOFTMAX: i64 = sys::MOERT_SCORE_SOFTMAX as i64;

/// Values of [`MoeKey::BALANCING_POLICY`] as [`Model::moe_int`] returns them.
pub const BALANCING_NONE: i64 = sys::MOERT_BALANCING_NONE as i64;
pub const BALANCING_LOSS_FREE_BIAS: i64 = sys::MOERT_BALANCING_LOSS_FREE_BIAS as i64;
pub const BALANCING_AUX_LOSS: i64 = sys::MOERT_BALANCING_AUX_LOSS as i64;
pub const BALANCING_SEQUENCE_AUX_LOSS: i64 = sys::MOERT_BALANCING_SEQUENCE_AUX_LOSS as i64;
pub const BALANCING_EXPERT_CHOICE: i64 = sys::MOERT_BALANCING_EXPERT_CHOICE as i64;

/// Where a session runs (`MOERT_DEVICE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Device(pub i32);

impl Device {
    pub const CPU: Device = Device(sys::MOERT_DEVICE_CPU as i32);
    pub const CUDA: Device = Device(sys::MOERT_DEVICE_CUDA as i32);
}

/// A session's mode (`MOERT_MODE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mode(pub i32);

impl Mode {
    pub const INFERENCE: Mode = Mode(sys::MOERT_MODE_INFERENCE as i32);
    pub const TRAINING: Mode = Mode(sys::MOERT_MODE_TRAINING as i32);
}

/// Which token counts a metrics call reads (`MOERT_COUNTS_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scope(pub i32);

impl Scope {
    /// The last forward pass (MaxVio_batch).
    pub const LAST: Scope = Scope(sys::MOERT_COUNTS_LAST as i32);
    /// Training passes since the last optimizer step.
    pub const STEP: Scope = Scope(sys::MOERT_COUNTS_STEP as i32);
    /// Eval and inference passes since the last metrics reset (MaxVio_global).
    pub const EVAL: Scope = Scope(sys::MOERT_COUNTS_EVAL as i32);
}

/// Selects every MoE layer where a method takes a layer index and says so.
pub const ALL_LAYERS: u32 = sys::MOERT_ALL_LAYERS;

/// Where the time of a session over several ranks goes ([`SessionOptions::communicator`]), summed
/// over its MoE layers' passes since its creation or the last [`Session::reset_metrics`]. The
/// waits are the communication that computation did not hide: compare with a session created
/// with "ep_overlap" "false" to see what overlap hides. All zero for a session alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    /// Waiting for tokens (and output gradients) to arrive.
    pub dispatch: std::time::Duration,
    /// Waiting for the experts' results to come back.
    pub combine: std::time::Duration,
    /// Computing this rank's routed experts.
    pub experts: std::time::Duration,
    /// Combining gradients across ranks after each backward.
    pub gradients: std::time::Duration,
}

/// A target that takes no part in [`Session::backward_loss`] (PyTorch's `ignore_index`).
pub const IGNORE_TARGET: i32 = sys::MOERT_IGNORE_TARGET;

// ---- Model -------------------------------------------------------------------------------------

/// One layer of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub index: u32,
    pub kind: LayerKind,
    /// "layer<index>" when the file names none.
    pub name: String,
    /// Values per input row (an embedding's context window in tokens).
    pub in_width: u32,
    /// Values per output row.
    pub out_width: u32,
}

/// What a forward pass takes and returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    pub input: InputKind,
    /// Values per input row (token ids or hidden values).
    pub input_width: u32,
    /// Values per output row.
    pub output_width: u32,
}

impl Io {
    /// The output length of a forward pass over `rows` rows whose input holds `input_len`
    /// values. Where `rows` does not fit the input (or exceeds 2^31 - 1) it is 0 and the call goes
    /// on: the library refuses it, naming the input, on every rank of a session among ranks (a
    /// rank that refused alone would leave the others waiting) and counted by a batcher; no wrong
    /// count becomes an allocation of its size.
    pub(crate) fn output_len(&self, rows: usize, input_len: usize) -> Result<usize> {
        if rows > i32::MAX as usize || rows as u64 * u64::from(self.input_width) != input_len as u64
        {
            return Ok(0);
        }
        rows.checked_mul(self.output_width as usize)
            .ok_or_else(|| invalid(format!("{rows} rows overflow the output size")))
    }
}

/// A loaded, validated model description.
pub struct Model {
    ptr: NonNull<sys::moert_model>,
}

// SAFETY: moert.h: "a moert_model is immutable after loading and may be used from any number of
// threads at once"; nothing ties it to the thread that loaded it.
unsafe impl Send for Model {}
// SAFETY: as above: concurrent use through shared references is what the header allows.
unsafe impl Sync for Model {}

impl Model {
    /// Loads and validates a binary model file; external weights are read relative to its
    /// directory. A malformed file is [`Code::INVALID_MODEL`] naming the layer and field at
    /// fault, an unreadable one [`Code::IO`].
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        check_abi()?;
        let path = c_path(path.as_ref())?;
        let mut out = ptr::null_mut();
        // SAFETY: a NUL-terminated path and a valid out-pointer; the library copies the path.
        check(unsafe { sys::moert_model_load_file(path.as_ptr(), &mut out) })?;
        Model::wrap(out)
    }

    /// Loads a model from memory (copied). `external_dir` is the directory a model with
    /// external weights resolves its data file against.
    pub fn from_bytes(data: &[u8], external_dir: Option<&Path>) -> Result<Model> {
        check_abi()?;
        let dir = external_dir.map(c_path).transpose()?;
        let mut out = ptr::null_mut();
        // SAFETY: data.len() bytes at data.as_ptr(), copied by the library; dir is NULL or a
        // NUL-terminated string.
        check(unsafe {
            sys::moert_model_load_buffer(
                data.as_ptr().cast(),
                data.len(),
                dir.as_ref().map_or(ptr::null(), |d| d.as_ptr()),
                &mut out,
            )
        })?;
        Model::wrap(out)
    }

    fn wrap(p: *mut sys::moert_model) -> Result<Model> {
        NonNull::new(p)
            .map(|ptr| Model { ptr })
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no model"))
    }

    /// The model's name ("" when it has none).
    pub fn name(&self) -> Result<String> {
        let mut out: *const c_char = ptr::null();
        // SAFETY: a live model and a valid out-pointer; the string is copied while self lives.
        check(unsafe { sys::moert_model_name(self.ptr.as_ptr(), &mut out) })?;
        Ok(copy_string(out))
    }

    /// Number of layers.
    pub fn num_layers(&self) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { sys::moert_model_num_layers(self.ptr.as_ptr(), &mut n) })?;
        Ok(n)
    }

    /// Layer `index`.
    pub fn layer(&self, index: u32) -> Result<LayerInfo> {
        let (mut kind, mut name, mut in_width, mut out_width) = (0i32, ptr::null(), 0u32, 0u32);
        // SAFETY: a live model and valid out-pointers; the name is copied while self lives.
        unsafe {
            check(sys::moert_model_layer_kind(
                self.ptr.as_ptr(),
                index,
                &mut kind,
            ))?;
            check(sys::moert_model_layer_name(
                self.ptr.as_ptr(),
                index,
                &mut name,
            ))?;
            check(sys::moert_model_layer_dims(
                self.ptr.as_ptr(),
                index,
                &mut in_width,
                &mut out_width,
            ))?;
        }
        Ok(LayerInfo {
            index,
            kind: LayerKind(kind),
            name: copy_string(name),
            in_width,
            out_width,
        })
    }

    /// Every layer.
    pub fn layers(&self) -> Result<Vec<LayerInfo>> {
        (0..self.num_layers()?).map(|i| self.layer(i)).collect()
    }

    /// What a forward pass takes and returns.
    pub fn io(&self) -> Result<Io> {
        let (mut kind, mut input_width, mut output_width) = (0i32, 0u32, 0u32);
        // SAFETY: a live model and valid out-pointers.
        check(unsafe {
            sys::moert_model_io(
                self.ptr.as_ptr(),
                &mut kind,
                &mut input_width,
                &mut output_width,
            )
        })?;
        Ok(Io {
            input: InputKind(kind),
            input_width,
            output_width,
        })
    }

    /// The number of token ids a token model accepts (ids 0 to vocab_size - 1);
    /// [`Code::INVALID_ARGUMENT`] for a model that takes hidden states.
    pub fn vocab_size(&self) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { sys::moert_model_vocab_size(self.ptr.as_ptr(), &mut n) })?;
        Ok(n)
    }

    /// Parameter counts: (every parameter, those one input row uses).
    pub fn num_parameters(&self) -> Result<(u64, u64)> {
        let (mut total, mut activated) = (0u64, 0u64);
        // SAFETY: a live model and valid out-pointers.
        check(unsafe {
            sys::moert_model_num_parameters(self.ptr.as_ptr(), &mut total, &mut activated)
        })?;
        Ok((total, activated))
    }

    /// An integer setting of MoE layer `index`.
    pub fn moe_int(&self, index: u32, key: MoeKey) -> Result<i64> {
        let mut v = 0i64;
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { sys::moert_model_moe_int(self.ptr.as_ptr(), index, key.0, &mut v) })?;
        Ok(v)
    }

    /// A floating-point setting of MoE layer `index`.
    pub fn moe_float(&self, index: u32, key: MoeKey) -> Result<f64> {
        let mut v = 0f64;
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { sys::moert_model_moe_float(self.ptr.as_ptr(), index, key.0, &mut v) })?;
        Ok(v)
    }

    /// Number of weight tensors of layer `index` (absent optional ones not counted).
    pub fn num_tensors(&self, index: u32) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { sys::moert_model_num_tensors(self.ptr.as_ptr(), index, &mut n) })?;
        Ok(n)
    }

    /// Weight tensor `tensor` of layer `index`, as the model holds it.
    pub fn tensor(&self, index: u32, tensor: u32) -> Result<TensorInfo> {
        let (mut name, mut stored, mut held, mut numel, mut bytes) =
            (ptr::null(), 0i32, 0i32, 0u64, 0u64);
        // SAFETY: a live model and valid out-pointers; the name is a static string.
        check(unsafe {
            sys::moert_model_tensor_info(
                self.ptr.as_ptr(),
                index,
                tensor,
                &mut name,
                &mut stored,
                &mut held,
                &mut numel,
                &mut bytes,
            )
        })?;
        Ok(TensorInfo {
            name: copy_string(name),
            stored: DType(stored),
            held: DType(held),
            numel,
            bytes,
        })
    }

    /// The bytes the model's weights take in memory as held.
    pub fn resident_bytes(&self) -> Result<u64> {
        let mut n = 0u64;
        // SAFETY: a live model and a valid out-pointer.
        check(unsafe { sys::moert_model_resident_bytes(self.ptr.as_ptr(), &mut n) })?;
        Ok(n)
    }

    /// `Some(step)` when the model was loaded from a checkpoint (whose training state loading
    /// verified, then dropped; a training session's load resumes it): the optimizer steps its
    /// run had taken. [`MoeKey::SAVED_BIAS_FROZEN`] and [`MoeKey::SAVED_BIAS_UPDATE_RATE`] read
    /// the balancing state it saved.
    pub fn checkpoint_step(&self) -> Result<Option<u64>> {
        let (mut is, mut step) = (0i32, 0u64);
        // SAFETY: a live model and valid out-pointers.
        check(unsafe { sys::moert_model_checkpoint_step(self.ptr.as_ptr(), &mut is, &mut step) })?;
        Ok((is != 0).then_some(step))
    }

    /// A new model with the MoE layers' routed and shared expert weights quantized to FP8 E4M3
    /// in 128x128 blocks (scales rounded up to powers of two with `power_of_two_scales`), and
    /// the number of tensors quantized (0 for a model without MoE layers).
    pub fn quantize_fp8(&self, power_of_two_scales: bool) -> Result<(Model, u32)> {
        let flags = if power_of_two_scales {
            sys::MOERT_FP8_POWER_OF_TWO_SCALES
        } else {
            0
        };
        let (mut out, mut quantized) = (ptr::null_mut(), 0u32);
        // SAFETY: a live model and valid out-pointers; the new model is ours to free.
        check(unsafe {
            sys::moert_model_quantize_fp8(self.ptr.as_ptr(), flags, &mut out, &mut quantized)
        })?;
        Ok((Model::wrap(out)?, quantized))
    }

    /// Writes the model as a binary model file at `path`, atomically; weights as held (FP8
    /// tensors as FP8 with their block scales).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        // SAFETY: a live model and a NUL-terminated path, copied.
        check(unsafe { sys::moert_model_save_file(self.ptr.as_ptr(), p.as_ptr()) })
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the model is ours and &mut self means no call is in flight; sessions created
        // from it keep what they need (moert.h).
        unsafe { sys::moert_model_free(self.ptr.as_ptr()) }
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name().unwrap_or_default())
            .finish()
    }
}

// ---- Session options ---------------------------------------------------------------------------

/// Options for [`Session::new`]: CPU, 1 thread, seed 0, inference mode by default.
pub struct SessionOptions {
    ptr: NonNull<sys::moert_session_options>,
}

// SAFETY: moert.h: options "must not be modified concurrently"; moving them to another thread
// is fine. Not Sync: the setters take &mut self, but the header promises nothing about reads
// racing a modification elsewhere, so sharing is left out.
unsafe impl Send for SessionOptions {}

impl SessionOptions {
    /// Options with the defaults.
    pub fn new() -> Result<SessionOptions> {
        check_abi()?;
        let mut out = ptr::null_mut();
        // SAFETY: a valid out-pointer.
        check(unsafe { sys::moert_session_options_create(&mut out) })?;
        NonNull::new(out)
            .map(|ptr| SessionOptions { ptr })
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no options"))
    }

    /// Device and index; CUDA is refused by [`Session::new`] ([`Code::UNSUPPORTED`]) where no
    /// CUDA backend can be loaded.
    pub fn device(&mut self, device: Device, index: i32) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe {
            sys::moert_session_options_set_device(self.ptr.as_ptr(), device.0, index)
        })?;
        Ok(self)
    }

    /// Worker threads for the session's CPU work, 1 to 1024.
    pub fn threads(&mut self, threads: u32) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_session_options_set_threads(self.ptr.as_ptr(), threads) })?;
        Ok(self)
    }

    /// Seed for everything random the session does.
    pub fn seed(&mut self, seed: u64) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_session_options_set_seed(self.ptr.as_ptr(), seed) })?;
        Ok(self)
    }

    /// Inference or training.
    pub fn mode(&mut self, mode: Mode) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_session_options_set_mode(self.ptr.as_ptr(), mode.0) })?;
        Ok(self)
    }

    /// A backend or training knob by name (see moert.h); unknown keys are an error.
    pub fn config(&mut self, key: &str, value: &str) -> Result<&mut Self> {
        let (k, v) = (c_string("key", key)?, c_string("value", value)?);
        // SAFETY: live options, exclusively borrowed; NUL-terminated strings, copied.
        check(unsafe {
            sys::moert_session_options_set_config(self.ptr.as_ptr(), k.as_ptr(), v.as_ptr())
        })?;
        Ok(self)
    }
}

impl fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionOptions").finish_non_exhaustive()
    }
}

impl Drop for SessionOptions {
    fn drop(&mut self) {
        // SAFETY: ours, and no call in flight.
        unsafe { sys::moert_session_options_free(self.ptr.as_ptr()) }
    }
}

// ---- Session -----------------------------------------------------------------------------------

/// The learning rate an optimizer step used and the gradient norm before clipping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub learning_rate: f64,
    pub gradient_norm: f64,
}

/// An element type of weights (`MOERT_DTYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DType(pub i32);

impl DType {
    pub const F32: DType = DType(sys::MOERT_DTYPE_F32 as i32);
    pub const BF16: DType = DType(sys::MOERT_DTYPE_BF16 as i32);
    /// OCP FP8 E4M3 codes with one fp32 scale per block.
    pub const F8E4M3: DType = DType(sys::MOERT_DTYPE_F8E4M3 as i32);
}

/// One weight tensor of a layer as the loaded model holds it ([`Model::tensor`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The schema's field name: "w1", "gate_bias".
    pub name: String,
    /// The element type the file stored it in.
    pub stored: DType,
    /// How it is held in memory: F8E4M3 for FP8 in 128x128 blocks, F32 for every other.
    pub held: DType,
    pub numel: u64,
    /// Bytes in memory as held (an FP8 tensor's block scales included).
    pub bytes: u64,
}

/// A trainable parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParameterInfo {
    /// "<layer name>.<tensor>", e.g. "moe0.w1".
    pub name: String,
    pub numel: u64,
}

/// Runs a model: forward passes and, in training mode, backward passes, optimizer steps and
/// checkpoints. Every method takes `&self`: share one session between threads with an `Arc`.
pub struct Session {
    ptr: NonNull<sys::moert_session>,
    io: Io,
    experts: HashMap<u32, usize>,
    numel: OnceLock<HashMap<String, u64>>,
}

// SAFETY: moert.h: "A moert_session may be called from any thread"; it is not tied to the thread
// that created it.
unsafe impl Send for Session {}
// SAFETY: moert.h: "calls on one session are serialised by the session itself", so calls
// through shared references from many threads are allowed. The one call that must not race
// (moert_session_free) happens in Drop, which has &mut self.
unsafe impl Sync for Session {}

impl Session {
    /// A session over `model` with `options` (None: the defaults). The session keeps what it
    /// needs: the model may be dropped afterwards.
    pub fn new(model: &Model, options: Option<&SessionOptions>) -> Result<Session> {
        check_abi()?;
        let io = model.io()?;
        let mut experts = HashMap::new();
        for layer in model.layers()? {
            if layer.kind == LayerKind::MOE {
                experts.insert(
                    layer.index,
                    model.moe_int(layer.index, MoeKey::NUM_EXPERTS)? as usize,
                );
            }
        }
        let mut out = ptr::null_mut();
        // SAFETY: a live model, live options or NULL, a valid out-pointer.
        check(unsafe {
            sys::moert_session_create(
                model.ptr.as_ptr(),
                options.map_or(ptr::null(), |o| o.ptr.as_ptr()),
                &mut out,
            )
        })?;
        let ptr = NonNull::new(out)
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no session"))?;
        Ok(Session {
            ptr,
            io,
            experts,
            numel: OnceLock::new(),
        })
    }

    /// What the forward pass takes and returns.
    pub fn io(&self) -> Io {
        self.io
    }

    fn raw(&self) -> *mut sys::moert_session {
        self.ptr.as_ptr()
    }

    /// Forward over `rows` rows of token ids (rows * input_width, row-major); returns
    /// rows * output_width values.
    pub fn forward_tokens(&self, tokens: &[i32], rows: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.io.output_len(rows, tokens.len())?];
        self.forward_tokens_into(tokens, rows, &mut out)?;
        Ok(out)
    }

    /// As [`Session::forward_tokens`], into `out` (rows * output_width values).
    pub fn forward_tokens_into(&self, tokens: &[i32], rows: usize, out: &mut [f32]) -> Result<()> {
        // SAFETY: slices with their true lengths; the library checks every size against them.
        check(unsafe {
            sys::moert_session_forward_tokens(
                self.raw(),
                tokens.as_ptr(),
                tokens.len() as u64,
                rows as u64,
                out.as_mut_ptr(),
                out.len() as u64,
            )
        })
    }

    /// Forward over `rows` rows of hidden states (rows * input_width); returns
    /// rows * output_width values.
    pub fn forward_hidden(&self, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.io.output_len(rows, input.len())?];
        self.forward_hidden_into(input, rows, &mut out)?;
        Ok(out)
    }

    /// As [`Session::forward_hidden`], into `out`.
    pub fn forward_hidden_into(&self, input: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        // SAFETY: slices with their true lengths.
        check(unsafe {
            sys::moert_session_forward_hidden(
                self.raw(),
                input.as_ptr(),
                input.len() as u64,
                rows as u64,
                out.as_mut_ptr(),
                out.len() as u64,
            )
        })
    }

    /// Forward over a padded batch of token ids: `row_mask` holds one value per row, `true` for a
    /// row that takes part and `false` for padding. A padding row's ids are not read (a pad id
    /// outside the vocabulary is fine); it is not routed or counted, its output row is zero, and
    /// it takes no part in [`Session::backward`] or [`Session::backward_loss`]. The other rows get
    /// exactly the outputs of a pass over them alone. A mask of another length than `rows` is an
    /// error.
    pub fn forward_tokens_masked(
        &self,
        tokens: &[i32],
        row_mask: &[bool],
        rows: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.io.output_len(rows, tokens.len())?];
        self.forward_tokens_masked_into(tokens, row_mask, rows, &mut out)?;
        Ok(out)
    }

    /// As [`Session::forward_tokens_masked`], into `out` (rows * output_width values).
    pub fn forward_tokens_masked_into(
        &self,
        tokens: &[i32],
        row_mask: &[bool],
        rows: usize,
        out: &mut [f32],
    ) -> Result<()> {
        // SAFETY: slices with their true lengths; a bool has the size and alignment of a u8 and
        // the value 0 or 1, so the mask is a valid array of uint8_t.
        check(unsafe {
            sys::moert_session_forward_tokens_masked(
                self.raw(),
                tokens.as_ptr(),
                tokens.len() as u64,
                row_mask.as_ptr().cast::<u8>(),
                row_mask.len() as u64,
                rows as u64,
                out.as_mut_ptr(),
                out.len() as u64,
            )
        })
    }

    /// As [`Session::forward_tokens_masked`], from hidden states: a padding row's values are not
    /// read (NaN is fine), and [`Session::backward`] gives it a zero input gradient.
    pub fn forward_hidden_masked(
        &self,
        input: &[f32],
        row_mask: &[bool],
        rows: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.io.output_len(rows, input.len())?];
        self.forward_hidden_masked_into(input, row_mask, rows, &mut out)?;
        Ok(out)
    }

    /// As [`Session::forward_hidden_masked`], into `out`.
    pub fn forward_hidden_masked_into(
        &self,
        input: &[f32],
        row_mask: &[bool],
        rows: usize,
        out: &mut [f32],
    ) -> Result<()> {
        // SAFETY: as in forward_tokens_masked_into.
        check(unsafe {
            sys::moert_session_forward_hidden_masked(
                self.raw(),
                input.as_ptr(),
                input.len() as u64,
                row_mask.as_ptr().cast::<u8>(),
                row_mask.len() as u64,
                rows as u64,
                out.as_mut_ptr(),
                out.len() as u64,
            )
        })
    }

    fn num_experts(&self, layer: u32) -> Result<usize> {
        self.experts.get(&layer).copied().ok_or_else(|| {
            let mut moe: Vec<u32> = self.experts.keys().copied().collect();
            moe.sort_unstable();
            invalid(format!(
                "layer {layer} is not a MoE layer (the model's MoE layers: {moe:?})"
            ))
        })
    }

    /// Tokens routed to each expert of MoE layer `layer` in `scope`.
    pub fn expert_counts(&self, layer: u32, scope: Scope) -> Result<Vec<i64>> {
        let mut counts = vec![0i64; self.num_experts(layer)?];
        // SAFETY: a slice with its true length.
        check(unsafe {
            sys::moert_session_expert_counts(
                self.raw(),
                layer,
                scope.0,
                counts.as_mut_ptr(),
                counts.len() as u64,
            )
        })?;
        Ok(counts)
    }

    /// MaxVio of MoE layer `layer` in `scope`, or the mean over MoE layers with [`ALL_LAYERS`].
    pub fn max_vio(&self, layer: u32, scope: Scope) -> Result<f64> {
        let mut v = 0f64;
        // SAFETY: a valid out-pointer.
        check(unsafe { sys::moert_session_max_vio(self.raw(), layer, scope.0, &mut v) })?;
        Ok(v)
    }

    /// Where this session's time over several ranks goes: see [`Profile`].
    pub fn profile(&self) -> Result<Profile> {
        let mut seconds = [0f64; sys::MOERT_PROFILE_COUNT as usize];
        // SAFETY: a buffer with its true length.
        check(unsafe {
            sys::moert_session_profile(self.raw(), seconds.as_mut_ptr(), seconds.len() as u64)
        })?;
        // `as` saturates: a figure the library never gives (negative, NaN) reads as zero.
        let at = |i: u32| std::time::Duration::from_nanos((seconds[i as usize] * 1e9) as u64);
        Ok(Profile {
            dispatch: at(sys::MOERT_PROFILE_DISPATCH),
            combine: at(sys::MOERT_PROFILE_COMBINE),
            experts: at(sys::MOERT_PROFILE_EXPERTS),
            gradients: at(sys::MOERT_PROFILE_GRADIENTS),
        })
    }

    /// Zeroes the [`Scope::EVAL`] counts of every MoE layer, and the [`Profile`].
    pub fn reset_metrics(&self) -> Result<()> {
        // SAFETY: a live session.
        check(unsafe { sys::moert_session_reset_metrics(self.raw()) })
    }

    /// Cross-entropy of the last training forward pass's logits against `targets` (one id per
    /// row) plus the auxiliary balancing losses; accumulates every gradient; returns the loss.
    /// The cross-entropy is the mean over the rows that take part (not padding of a masked pass)
    /// whose target is not [`IGNORE_TARGET`].
    pub fn backward_loss(&self, targets: &[i32]) -> Result<f64> {
        let mut loss = 0f64;
        // SAFETY: a slice with its true length and a valid out-pointer.
        check(unsafe {
            sys::moert_session_backward_loss(
                self.raw(),
                targets.as_ptr(),
                targets.len() as u64,
                &mut loss,
            )
        })?;
        Ok(loss)
    }

    /// Back-propagates `grad_out` (gradient of the last training forward pass's outputs) and
    /// returns the auxiliary loss; `grad_in` receives the input gradient (hidden-state models).
    pub fn backward(&self, grad_out: &[f32], grad_in: Option<&mut [f32]>) -> Result<f64> {
        let mut aux = 0f64;
        let (gi, gi_len) =
            grad_in.map_or((ptr::null_mut(), 0), |g| (g.as_mut_ptr(), g.len() as u64));
        // SAFETY: slices with their true lengths (or NULL and 0), a valid out-pointer.
        check(unsafe {
            sys::moert_session_backward(
                self.raw(),
                grad_out.as_ptr(),
                grad_out.len() as u64,
                gi,
                gi_len,
                &mut aux,
            )
        })?;
        Ok(aux)
    }

    /// Zeroes the accumulated gradients and the micro-batch count.
    pub fn zero_grad(&self) -> Result<()> {
        // SAFETY: a live session.
        check(unsafe { sys::moert_session_zero_grad(self.raw()) })
    }

    /// One optimizer step, then the loss-free bias update. A step made and counted before the
    /// call failed (a parameter pushed past the fp32 range, for one) gives an error whose
    /// [`Error::step_made`] holds its figures.
    pub fn step(&self) -> Result<Step> {
        // moert.h writes both only for a step that was made; NaN is no learning rate.
        let (mut lr, mut norm) = (f64::NAN, f64::NAN);
        // SAFETY: valid out-pointers.
        check(unsafe { sys::moert_session_step(self.raw(), &mut lr, &mut norm) }).map_err(
            |mut e| {
                if !lr.is_nan() {
                    e.step_made = Some((lr.to_bits(), norm.to_bits()));
                }
                e
            },
        )?;
        Ok(Step {
            learning_rate: lr,
            gradient_norm: norm,
        })
    }

    /// Optimizer steps taken (restored from checkpoints).
    pub fn step_count(&self) -> Result<u64> {
        let mut n = 0u64;
        // SAFETY: a valid out-pointer.
        check(unsafe { sys::moert_session_step_count(self.raw(), &mut n) })?;
        Ok(n)
    }

    /// Evaluation mode (true) or training (false).
    pub fn set_eval(&self, eval: bool) -> Result<()> {
        // SAFETY: a live session.
        check(unsafe { sys::moert_session_set_eval(self.raw(), i32::from(eval)) })
    }

    /// A knob by name (see moert.h), for this session from now on; training knobs need a
    /// training session.
    pub fn set_config(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (c_string("key", key)?, c_string("value", value)?);
        // SAFETY: NUL-terminated strings, copied.
        check(unsafe { sys::moert_session_set_config(self.raw(), k.as_ptr(), v.as_ptr()) })
    }

    /// Number of trainable parameter tensors.
    pub fn num_parameters(&self) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: a valid out-pointer.
        check(unsafe { sys::moert_session_num_parameters(self.raw(), &mut n) })?;
        Ok(n)
    }

    /// Trainable parameter `index`.
    pub fn parameter(&self, index: u32) -> Result<ParameterInfo> {
        let (mut name, mut numel) = (ptr::null(), 0u64);
        // SAFETY: valid out-pointers; the name is copied while self lives.
        check(unsafe {
            sys::moert_session_parameter_info(self.raw(), index, &mut name, &mut numel)
        })?;
        Ok(ParameterInfo {
            name: copy_string(name),
            numel,
        })
    }

    /// Every trainable parameter.
    pub fn parameters(&self) -> Result<Vec<ParameterInfo>> {
        (0..self.num_parameters()?)
            .map(|i| self.parameter(i))
            .collect()
    }

    fn numel(&self, name: &str) -> Result<usize> {
        let table = match self.numel.get() {
            Some(t) => t,
            None => {
                let t = self
                    .parameters()?
                    .into_iter()
                    .map(|p| (p.name, p.numel))
                    .collect();
                self.numel.get_or_init(|| t)
            }
        };
        table
            .get(name)
            .map(|&n| n as usize)
            .ok_or_else(|| invalid(format!("no parameter named '{name}'")))
    }

    fn read(
        &self,
        name: &str,
        f: unsafe extern "C" fn(
            *const sys::moert_session,
            *const c_char,
            *mut f32,
            u64,
        ) -> *mut sys::moert_status,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.numel(name)?];
        let n = c_string("name", name)?;
        // SAFETY: f is one of the library's getters; a slice with its true length.
        check(unsafe { f(self.raw(), n.as_ptr(), out.as_mut_ptr(), out.len() as u64) })?;
        Ok(out)
    }

    fn write(
        &self,
        name: &str,
        values: &[f32],
        f: unsafe extern "C" fn(
            *mut sys::moert_session,
            *const c_char,
            *const f32,
            u64,
        ) -> *mut sys::moert_status,
    ) -> Result<()> {
        let n = c_string("name", name)?;
        // SAFETY: f is one of the library's setters; a slice with its true length, copied.
        check(unsafe { f(self.raw(), n.as_ptr(), values.as_ptr(), values.len() as u64) })
    }

    /// A copy of parameter `name` (row-major).
    pub fn get_parameter(&self, name: &str) -> Result<Vec<f32>> {
        self.read(name, sys::moert_session_get_parameter)
    }

    /// Writes parameter `name`; NaN or infinity is refused ([`Code::NUMERIC`]).
    pub fn set_parameter(&self, name: &str, values: &[f32]) -> Result<()> {
        self.write(name, values, sys::moert_session_set_parameter)
    }

    /// A copy of the accumulated gradient of parameter `name`.
    pub fn get_gradient(&self, name: &str) -> Result<Vec<f32>> {
        self.read(name, sys::moert_session_get_gradient)
    }

    /// Writes the accumulated gradient of parameter `name`.
    pub fn set_gradient(&self, name: &str, values: &[f32]) -> Result<()> {
        self.write(name, values, sys::moert_session_set_gradient)
    }

    /// The loss-free balancing bias of MoE layer `layer`, one value per routed expert.
    pub fn expert_bias(&self, layer: u32) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.num_experts(layer)?];
        // SAFETY: a slice with its true length.
        check(unsafe {
            sys::moert_session_get_expert_bias(
                self.raw(),
                layer,
                out.as_mut_ptr(),
                out.len() as u64,
            )
        })?;
        Ok(out)
    }

    /// Sets the loss-free balancing bias of MoE layer `layer`.
    pub fn set_expert_bias(&self, layer: u32, bias: &[f32]) -> Result<()> {
        // SAFETY: a slice with its true length, copied.
        check(unsafe {
            sys::moert_session_set_expert_bias(self.raw(), layer, bias.as_ptr(), bias.len() as u64)
        })
    }

    /// Bias update rate gamma of MoE layer `layer` or [`ALL_LAYERS`], from the next step on.
    pub fn set_bias_update_rate(&self, layer: u32, gamma: f64) -> Result<()> {
        // SAFETY: a live session.
        check(unsafe { sys::moert_session_set_bias_update_rate(self.raw(), layer, gamma) })
    }

    /// Freezes or thaws the bias of MoE layer `layer` or [`ALL_LAYERS`].
    pub fn set_bias_frozen(&self, layer: u32, frozen: bool) -> Result<()> {
        // SAFETY: a live session.
        check(unsafe { sys::moert_session_set_bias_frozen(self.raw(), layer, i32::from(frozen)) })
    }

    /// Writes a checkpoint atomically; on [`Code::IO`] the previous file at `path` is intact.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        // SAFETY: a NUL-terminated path, copied.
        check(unsafe { sys::moert_session_save(self.raw(), p.as_ptr()) })
    }

    /// Restores a checkpoint; a corrupt or foreign file is refused and the state is kept.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        // SAFETY: a NUL-terminated path, copied.
        check(unsafe { sys::moert_session_load(self.raw(), p.as_ptr()) })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: ours, and &mut self means no call is in flight on any thread.
        unsafe { sys::moert_session_free(self.raw()) }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").field("io", &self.io).finish()
    }
}

// ---- Load limits -------------------------------------------------------------------------------

impl Code {
    /// A load limit ([`LoadOptions`], or the defaults) refuses the input.
    pub const LIMIT: Code = Code(sys::MOERT_ERR_LIMIT as i32);
}

/// Limits on what loading an untrusted file may cost, checked on the totals the description
/// declares before anything is allocated or read for the model; a load over one is
/// [`Code::LIMIT`]. Defaults (also those of [`Model::load`] and [`Model::from_bytes`]): a model
/// may hold 1 GiB of tensors (counted as fp32, whatever their source) and a load may read 4 GiB.
pub struct LoadOptions {
    ptr: NonNull<sys::moert_load_options>,
}

// SAFETY: moert.h: load options "must not be modified concurrently"; loads only read them. The
// setters take &mut self and the loads &self, so the borrow rules give exactly that.
unsafe impl Send for LoadOptions {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for LoadOptions {}

impl LoadOptions {
    /// Load options with the defaults.
    pub fn new() -> Result<LoadOptions> {
        check_abi()?;
        let mut out = ptr::null_mut();
        // SAFETY: a valid out-pointer.
        check(unsafe { sys::moert_load_options_create(&mut out) })?;
        NonNull::new(out)
            .map(|ptr| LoadOptions { ptr })
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no load options"))
    }

    /// The bytes a loaded model may hold: its tensors as fp32, and a checkpoint's training state
    /// when a session loads it; never more than physical memory.
    pub fn max_memory(&mut self, bytes: u64) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_load_options_set_max_memory(self.ptr.as_ptr(), bytes) })?;
        Ok(self)
    }

    /// The bytes a load may read: the description and the external data it uses.
    pub fn max_file_bytes(&mut self, bytes: u64) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe { sys::moert_load_options_set_max_file_bytes(self.ptr.as_ptr(), bytes) })?;
        Ok(self)
    }

    /// When `on`, an external data file (a checkpoint's included) reached by a way out of the
    /// model's directory is refused with [`Code::INVALID_MODEL`]: without it a link there named
    /// as the data file makes any readable file the weights. Off by default, because content
    /// stores such as the Hugging Face hub cache link every file from elsewhere. `moert.h`
    /// (`moert_load_options`) says how it is checked, and what differs without `openat2`.
    pub fn confine_external_data(&mut self, on: bool) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe {
            sys::moert_load_options_set_confine_external_data(self.ptr.as_ptr(), i32::from(on))
        })?;
        Ok(self)
    }

    /// When `on`, a load reads the description alone: no tensor is read or initialised and the
    /// external data file is not opened, so a model of any size loads in a scan of its
    /// description. Such a model answers the calls that describe it (layers, parameter counts,
    /// tensor info, resident bytes: what a full load would hold) and refuses sessions, batchers,
    /// saves and FP8 quantization with [`Code::INVALID_ARGUMENT`]. `moert.h`
    /// (`moert_load_options_set_description_only`) says what is and is not checked.
    pub fn description_only(&mut self, on: bool) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed.
        check(unsafe {
            sys::moert_load_options_set_description_only(self.ptr.as_ptr(), i32::from(on))
        })?;
        Ok(self)
    }

    /// As [`Model::load`], within these limits.
    pub fn load_model(&self, path: impl AsRef<Path>) -> Result<Model> {
        let path = c_path(path.as_ref())?;
        let mut out = ptr::null_mut();
        // SAFETY: a NUL-terminated path, live options, a valid out-pointer; nothing is kept.
        check(unsafe {
            sys::moert_model_load_file_with_options(path.as_ptr(), self.ptr.as_ptr(), &mut out)
        })?;
        Model::wrap(out)
    }

    /// As [`Model::from_bytes`], within these limits.
    pub fn model_from_bytes(&self, data: &[u8], external_dir: Option<&Path>) -> Result<Model> {
        let dir = external_dir.map(c_path).transpose()?;
        let mut out = ptr::null_mut();
        // SAFETY: data.len() bytes at data.as_ptr(), copied; dir is NULL or NUL-terminated; live
        // options; a valid out-pointer.
        check(unsafe {
            sys::moert_model_load_buffer_with_options(
                data.as_ptr().cast(),
                data.len(),
                dir.as_ref().map_or(ptr::null(), |d| d.as_ptr()),
                self.ptr.as_ptr(),
                &mut out,
            )
        })?;
        Model::wrap(out)
    }

    /// As [`Session::load`], within these limits as well as the session's own (what its
    /// architecture can hold).
    pub fn load_checkpoint(&self, session: &Session, path: impl AsRef<Path>) -> Result<()> {
        let p = c_path(path.as_ref())?;
        // SAFETY: a live session (calls on it are serialised by the library), a NUL-terminated
        // path, live options; nothing is kept.
        check(unsafe {
            sys::moert_session_load_with_options(session.raw(), p.as_ptr(), self.ptr.as_ptr())
        })
    }
}

impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions").finish_non_exhaustive()
    }
}

impl Drop for LoadOptions {
    fn drop(&mut self) {
        // SAFETY: ours, and &mut self means no load is using it.
        unsafe { sys::moert_load_options_free(self.ptr.as_ptr()) }
    }
}

// ---- Communicators -----------------------------------------------------------------------------

impl Code {
    /// A collective failed or timed out; the communicator is broken and every later collective
    /// fails at once.
    pub const COMM: Code = Code(sys::MOERT_ERR_COMM as i32);
}

/// Bytes of an NCCL unique id.
pub const NCCL_UNIQUE_ID_BYTES: usize = sys::MOERT_NCCL_UNIQUE_ID_BYTES as usize;

/// Connects the processes ("ranks") of one job, for sessions that share their work across them
/// (expert and data parallelism): over MPI ([`Communicator::mpi`]) or NCCL
/// ([`Communicator::nccl`]). `moert.h` says which calls are collective, how long a collective
/// waits, what MPI's lifetime is and how to launch a job with mpirun. Dropping it releases this
/// handle's reference: session options and sessions that hold the communicator keep it alive.
pub struct Communicator {
    ptr: NonNull<sys::moert_comm>,
}

// SAFETY: moert.h: "a moert_comm may be used from any thread". The one call that must not race
// (moert_comm_free) happens in Drop, which has &mut self.
unsafe impl Send for Communicator {}
// SAFETY: as above; every method but Drop takes &self and the library serialises what it must.
unsafe impl Sync for Communicator {}

impl Communicator {
    fn from_create(
        create: impl FnOnce(*mut *mut sys::moert_comm) -> *mut sys::moert_status,
    ) -> Result<Communicator> {
        check_abi()?;
        let mut out = ptr::null_mut();
        check(create(&mut out))?;
        NonNull::new(out)
            .map(|ptr| Communicator { ptr })
            .ok_or_else(|| Error::new(Code::INTERNAL, "the library returned no communicator"))
    }

    /// An MPI communicator over MPI_COMM_WORLD, initialising MPI when the process has not (a
    /// program started without mpirun is a job of one rank). Collective.
    pub fn mpi() -> Result<Communicator> {
        // SAFETY: NULL selects MPI_COMM_WORLD; a valid out-pointer.
        Communicator::from_create(|out| unsafe { sys::moert_comm_create_mpi(ptr::null(), out) })
    }

    /// As [`Communicator::mpi`], with the communicator's timeout: the creation waits at most
    /// `timeout` for the other ranks (more than zero and at most a year), and the collectives
    /// start with it, as [`Communicator::set_timeout`] would set it. A job run with a short
    /// timeout then fails within it when a rank never comes to the creation.
    pub fn mpi_with_timeout(timeout: std::time::Duration) -> Result<Communicator> {
        // SAFETY: NULL selects MPI_COMM_WORLD; a valid out-pointer.
        Communicator::from_create(|out| unsafe {
            sys::moert_comm_create_mpi_with_timeout(ptr::null(), timeout.as_secs_f64(), out)
        })
    }

    /// An MPI communicator over a duplicate of the host's communicator. Collective over it.
    ///
    /// # Safety
    /// `comm` must point at a live Open MPI `MPI_Comm` of the host for the duration of the call.
    pub unsafe fn mpi_from_raw(comm: *const std::os::raw::c_void) -> Result<Communicator> {
        if comm.is_null() {
            return Err(Error::new(
                Code::INVALID_ARGUMENT,
                "the MPI_Comm pointer is NULL",
            ));
        }
        // SAFETY: the caller's promise; a valid out-pointer.
        Communicator::from_create(|out| unsafe { sys::moert_comm_create_mpi(comm, out) })
    }

    /// A fresh NCCL unique id; rank 0 makes it and ships it to the other ranks by any means.
    pub fn nccl_unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES]> {
        check_abi()?;
        let mut id = [0u8; NCCL_UNIQUE_ID_BYTES];
        // SAFETY: a buffer of the length passed.
        check(unsafe { sys::moert_comm_nccl_unique_id(id.as_mut_ptr(), id.len() as u64) })?;
        Ok(id)
    }

    /// Rank `rank` of an NCCL communicator of `size` ranks on CUDA device `device`, from the id
    /// every rank passes. Collective.
    pub fn nccl(id: &[u8], rank: i32, size: i32, device: i32) -> Result<Communicator> {
        // SAFETY: the id's bytes and length, copied; a valid out-pointer.
        Communicator::from_create(|out| unsafe {
            sys::moert_comm_create_nccl(id.as_ptr(), id.len() as u64, rank, size, device, out)
        })
    }

    /// As [`Communicator::nccl`], with the communicator's timeout for the creation and the
    /// collectives after it (see [`Communicator::mpi_with_timeout`]).
    pub fn nccl_with_timeout(
        id: &[u8],
        rank: i32,
        size: i32,
        device: i32,
        timeout: std::time::Duration,
    ) -> Result<Communicator> {
        // SAFETY: the id's bytes and length, copied; a valid out-pointer.
        Communicator::from_create(|out| unsafe {
            sys::moert_comm_create_nccl_with_timeout(
                id.as_ptr(),
                id.len() as u64,
                rank,
                size,
                device,
                timeout.as_secs_f64(),
                out,
            )
        })
    }

    /// This process's rank in `[0, size)`.
    pub fn rank(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: a live communicator, a valid out-pointer.
        check(unsafe { sys::moert_comm_rank(self.ptr.as_ptr(), &mut v) })?;
        Ok(v)
    }

    /// The number of ranks.
    pub fn size(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: a live communicator, a valid out-pointer.
        check(unsafe { sys::moert_comm_size(self.ptr.as_ptr(), &mut v) })?;
        Ok(v)
    }

    /// How long every collective waits before it fails with [`Code::COMM`] (default 10
    /// minutes). Local to this rank.
    pub fn set_timeout(&self, timeout: std::time::Duration) -> Result<()> {
        // SAFETY: a live communicator.
        check(unsafe { sys::moert_comm_set_timeout(self.ptr.as_ptr(), timeout.as_secs_f64()) })
    }

    /// Blocks until every rank has called it. Collective.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live communicator.
        check(unsafe { sys::moert_comm_barrier(self.ptr.as_ptr()) })
    }

    /// Replaces each `data[i]`, in place, by the sum over ranks of every rank's `data[i]`, added
    /// in rank order (((x0 + x1) + x2) + ...), so that every rank gets the same bits on every
    /// run: for a host's own figures, such as a loss summed over the rows each rank evaluated.
    /// Collective: every rank passes a slice of the same length (an empty one is a no-op on every
    /// rank). [`Code::UNSUPPORTED`] on an NCCL communicator, whose collectives move device
    /// memory; [`Code::COMM`] on timeout or a broken communicator.
    pub fn all_reduce_sum(&self, data: &mut [f64]) -> Result<()> {
        // SAFETY: a live communicator and a slice with its true length.
        check(unsafe {
            sys::moert_comm_all_reduce_sum(self.ptr.as_ptr(), data.as_mut_ptr(), data.len() as u64)
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: ours, and &mut self means no call is in flight on any thread.
        unsafe { sys::moert_comm_free(self.ptr.as_ptr()) }
    }
}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank().ok())
            .field("size", &self.size().ok())
            .finish()
    }
}

impl SessionOptions {
    /// Attaches `comm` with an expert-parallel size (>= 1, dividing its size) for the sessions
    /// created from these options; the options keep their own reference. `None` with 1
    /// detaches it.
    pub fn communicator(
        &mut self,
        comm: Option<&Communicator>,
        expert_parallel: i32,
    ) -> Result<&mut Self> {
        // SAFETY: live options, exclusively borrowed; a live communicator or NULL.
        check(unsafe {
            sys::moert_session_options_set_comm(
                self.ptr.as_ptr(),
                comm.map_or(ptr::null_mut(), |c| c.ptr.as_ptr()),
                expert_parallel,
            )
        })?;
        Ok(self)
    }
}

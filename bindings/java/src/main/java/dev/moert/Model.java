package dev.moert;

import java.nio.ByteBuffer;
import java.nio.file.Path;

/**
 * A loaded, validated model description. Immutable: it may be used from any number of threads.
 * Sessions created from it stay valid after it is closed.
 */
public final class Model extends NativeHandle<SWIGTYPE_p_moert_model> {
  /** One layer: kind ({@code CapiConstants.MOERT_LAYER_*}), name and row widths. */
  public record Layer(int index, int kind, String name, int inWidth, int outWidth) {}

  /**
   * What a forward pass takes ({@code CapiConstants.MOERT_INPUT_*}, values per row) and returns
   * (values per row).
   */
  public record Io(int inputKind, int inputWidth, int outputWidth) {
    /**
     * The output array of a forward pass over rows rows whose input holds inputLength values.
     * Where rows does not fit the input it is empty and the call goes on: the library refuses it,
     * naming the input, on every rank of a session among ranks (a rank that refused alone would
     * leave the others waiting) and counted by a batcher; no wrong count becomes an allocation of
     * its size.
     */
    float[] outputFor(int rows, int inputLength) {
      if (rows <= 0 || (long) rows * inputWidth != inputLength) {
        return new float[0];
      }
      long outputs = (long) rows * outputWidth;
      if (outputs > Integer.MAX_VALUE - 8) {
        throw new MoertException(
            CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
            rows + " rows of " + outputWidth + " outputs exceed the largest Java array");
      }
      return new float[(int) outputs];
    }
  }

  /** Every parameter, and those one input row uses. */
  public record ParameterCounts(long total, long activated) {}

  /**
   * One weight tensor of a layer as the loaded model holds it: the schema's field name, the
   * element type the file stored it in and the one it is held in ({@code
   * CapiConstants.MOERT_DTYPE_*}: F8E4M3 for FP8 in 128x128 blocks, F32 for every other), its
   * elements and its bytes in memory (an FP8 tensor's block scales included).
   */
  public record Tensor(String name, int storedDtype, int heldDtype, long numel, long bytes) {}


  Model(SWIGTYPE_p_moert_model ptr) {
    super("model", ptr, () -> Capi.moert_model_free(ptr));
  }

  /**
   * Loads and validates a binary model file; external weights are read relative to its
   * directory.
   *
   * @throws MoertException MOERT_ERR_INVALID_MODEL naming the layer and field at fault,
   *     MOERT_ERR_IO when the file cannot be read
   */
  public static Model load(Path path) {
    return load(path == null ? null : path.toString());
  }

  /** As {@link #load(Path)}. */
  public static Model load(String path) {
    Moert.load();
    SWIGTYPE_p_moert_model[] out = new SWIGTYPE_p_moert_model[1];
    MoertException.check(Capi.moert_model_load_file(path, out));
    return new Model(out[0]);
  }

  /**
   * Loads a model from bytes (copied). externalDir is the directory a model with external weights
   * resolves its data file against, null when it has none.
   */
  public static Model fromBytes(byte[] data, String externalDir) {
    return fromBuffer(data == null ? null : ByteBuffer.wrap(data), externalDir);
  }

  /**
   * Loads a model from the remaining bytes of a buffer of any kind (heap, direct, read-only), copied; the
   * buffer's position is unchanged.
   */
  public static Model fromBuffer(ByteBuffer data, String externalDir) {
    Moert.load();
    if (data == null) {
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "data is null");
    }
    SWIGTYPE_p_moert_model[] out = new SWIGTYPE_p_moert_model[1];
    MoertException.check(Capi.moert_model_load_buffer(Buffers.in(data), externalDir, out));
    return new Model(out[0]);
  }

  /** The model's name ("" when it has none). */
  public String name() {
    try (Use u = use()) {
      String[] out = new String[1];
      MoertException.check(Capi.moert_model_name(u.ptr(), out));
      return out[0];
    }
  }

  /** Number of layers. */
  public int numLayers() {
    try (Use u = use()) {
      int[] out = new int[1];
      MoertException.check(Capi.moert_model_num_layers(u.ptr(), out));
      return out[0];
    }
  }

  /** Layer i. */
  public Layer layer(int i) {
    long index = checkUint32("layer index", i);
    try (Use u = use()) {
      int[] kind = new int[1];
      String[] name = new String[1];
      int[] in = new int[1];
      int[] out = new int[1];
      MoertException.check(Capi.moert_model_layer_kind(u.ptr(), index, kind));
      MoertException.check(Capi.moert_model_layer_name(u.ptr(), index, name));
      MoertException.check(Capi.moert_model_layer_dims(u.ptr(), index, in, out));
      return new Layer(i, kind[0], name[0], in[0], out[0]);
    }
  }

  /** Every layer. */
  public Layer[] layers() {
    Layer[] all = new Layer[numLayers()];
    for (int i = 0; i < all.length; i++) {
      all[i] = layer(i);
    }
    return all;
  }

  /** What a forward pass takes and returns. */
  public Io io() {
    try (Use u = use()) {
      int[] kind = new int[1];
      int[] in = new int[1];
      int[] out = new int[1];
      MoertException.check(Capi.moert_model_io(u.ptr(), kind, in, out));
      return new Io(kind[0], in[0], out[0]);
    }
  }

  /**
   * The number of token ids a token model accepts (ids 0 to vocabSize() - 1).
   *
   * @throws MoertException MOERT_ERR_INVALID_ARGUMENT for a model that takes hidden states
   */
  public long vocabSize() {
    try (Use u = use()) {
      int[] out = new int[1];
      MoertException.check(Capi.moert_model_vocab_size(u.ptr(), out));
      return Integer.toUnsignedLong(out[0]);
    }
  }

  /** Parameter counts (the loss-free bias excluded). */
  public ParameterCounts numParameters() {
    try (Use u = use()) {
      long[] total = new long[1];
      long[] activated = new long[1];
      MoertException.check(Capi.moert_model_num_parameters(u.ptr(), total, activated));
      return new ParameterCounts(total[0], activated[0]);
    }
  }

  /** An integer setting ({@code CapiConstants.MOERT_MOE_*}) of MoE layer i. */
  public long moeInt(int i, int key) {
    long index = checkUint32("layer index", i);
    try (Use u = use()) {
      long[] out = new long[1];
      MoertException.check(Capi.moert_model_moe_int(u.ptr(), index, key, out));
      return out[0];
    }
  }

  /** A floating-point setting ({@code CapiConstants.MOERT_MOE_*}) of MoE layer i. */
  public double moeFloat(int i, int key) {
    long index = checkUint32("layer index", i);
    try (Use u = use()) {
      double[] out = new double[1];
      MoertException.check(Capi.moert_model_moe_float(u.ptr(), index, key, out));
      return out[0];
    }
  }

  /** Number of weight tensors of layer i (absent optional ones not counted). */
  public int numTensors(int i) {
    long index = checkUint32("layer index", i);
    try (Use u = use()) {
      int[] out = new int[1];
      MoertException.check(Capi.moert_model_num_tensors(u.ptr(), index, out));
      return out[0];
    }
  }

  /** Weight tensor t of layer i, as the model holds it. */
  public Tensor tensor(int i, int t) {
    long index = checkUint32("layer index", i);
    long tensor = checkUint32("tensor index", t);
    try (Use u = use()) {
      String[] name = new String[1];
      int[] stored = new int[1];
      int[] held = new int[1];
      long[] numel = new long[1];
      long[] bytes = new long[1];
      MoertException.check(
          Capi.moert_model_tensor_info(u.ptr(), index, tensor, name, stored, held, numel, bytes));
      return new Tensor(name[0], stored[0], held[0], numel[0], bytes[0]);
    }
  }

  /** The bytes the model's weights take in memory as held. */
  public long residentBytes() {
    try (Use u = use()) {
      long[] out = new long[1];
      MoertException.check(Capi.moert_model_resident_bytes(u.ptr(), out));
      return out[0];
    }
  }

  /**
   * The optimizer steps of the run whose checkpoint this model was loaded from (loading verified
   * its training state, then dropped it; {@code Session.load} resumes it), or -1 for a model
   * that is not a checkpoint (the count is unsigned: one of 2^63 or more reads as negative, as
   * {@code Long.toUnsignedString} shows; -1 is never a step). {@code
   * CapiConstants.MOERT_MOE_SAVED_*} read the balancing state it saved.
   */
  public long checkpointStep() {
    try (Use u = use()) {
      int[] is = new int[1];
      long[] step = new long[1];
      MoertException.check(Capi.moert_model_checkpoint_step(u.ptr(), is, step));
      return is[0] != 0 ? step[0] : -1;
    }
  }

  /**
   * A new model whose MoE layers' routed and shared expert weights are FP8 E4M3 in 128x128
   * blocks (scales rounded up to powers of two with powerOfTwoScales). The caller closes it.
   */
  public Model quantizeFp8(boolean powerOfTwoScales) {
    try (Use u = use()) {
      SWIGTYPE_p_moert_model[] out = new SWIGTYPE_p_moert_model[1];
      int[] quantized = new int[1];
      long flags = powerOfTwoScales ? CapiConstants.MOERT_FP8_POWER_OF_TWO_SCALES : 0;
      MoertException.check(Capi.moert_model_quantize_fp8(u.ptr(), flags, out, quantized));
      return new Model(out[0]);
    }
  }

  /** Writes the model as a binary model file, atomically; weights as held. */
  public void save(Path path) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_model_save_file(u.ptr(), path.toString()));
    }
  }
}

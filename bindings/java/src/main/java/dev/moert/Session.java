package dev.moert;

import java.nio.ByteBuffer;
import java.nio.DoubleBuffer;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.LongBuffer;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

/**
 * Runs a model: forward passes and, in training mode, backward passes, optimizer steps and
 * checkpoints. Any number of threads may call one session at once; the library serialises the
 * calls.
 *
 * <p>Data goes in and out either as Java arrays (convenient; copied by JNI) or as NIO buffers of
 * any kind: heap, direct, read-only (inputs), sliced, views of a ByteBuffer in either byte order.
 * A direct buffer in native byte order is passed to the library in place, without a copy; other
 * kinds are copied, converting the byte order (see {@code Buffers}). A buffer argument covers its
 * remaining elements (position to limit), its position is left as it was, and an output buffer is
 * written only when the call succeeds.
 */
public final class Session extends NativeHandle<SWIGTYPE_p_moert_session> {
  /** The learning rate an optimizer step used and the gradient norm before clipping. */
  public record Step(double learningRate, double gradientNorm) implements java.io.Serializable {}

  /** A trainable parameter tensor: "layer.tensor" name and element count. */
  public record Parameter(String name, long numel) {}

  private final Model.Io io;
  private final Map<Integer, Integer> experts; // MoE layer index -> routed experts
  private volatile Map<String, Long> numel; // parameter name -> elements, filled on first use

  private Session(SWIGTYPE_p_moert_session ptr, Model.Io io, Map<Integer, Integer> experts) {
    super("session", ptr, () -> Capi.moert_session_free(ptr));
    this.io = io;
    this.experts = experts;
  }

  /** A session over model with options (null: the defaults); the model may be closed after. */
  public static Session create(Model model, SessionOptions options) {
    Moert.load();
    // A null model goes to the library, which refuses it after meeting the job's other ranks
    // when the options carry a communicator.
    Model.Io io = model == null ? null : model.io();
    Map<Integer, Integer> experts = new HashMap<>();
    for (Model.Layer layer : model == null ? new Model.Layer[0] : model.layers()) {
      if (layer.kind() == CapiConstants.MOERT_LAYER_MOE) {
        experts.put(
            layer.index(), (int) model.moeInt(layer.index(), CapiConstants.MOERT_MOE_NUM_EXPERTS));
      }
    }
    SWIGTYPE_p_moert_session[] out = new SWIGTYPE_p_moert_session[1];
    try (var m = model == null ? null : model.use();
        var o = options == null ? null : options.use()) {
      MoertException.check(
          Capi.moert_session_create(m == null ? null : m.ptr(), o == null ? null : o.ptr(), out));
    }
    return new Session(out[0], io, experts);
  }

  /** What the forward pass takes and returns. */
  public Model.Io io() {
    return io;
  }

  // ---- Forward -------------------------------------------------------------------------------

  /** Forward over rows rows of token ids (rows * inputWidth, row-major); rows * outputWidth out. */
  public float[] forwardTokens(int[] tokens, int rows) {
    tokens = tokens == null ? new int[0] : tokens; // the library refuses it on every rank
    float[] out = io.outputFor(rows, tokens.length);
    forwardTokens(IntBuffer.wrap(tokens), rows, FloatBuffer.wrap(out));
    return out;
  }

  /**
   * Forward from and into buffers of any kind (see the class comment): out receives rows *
   * outputWidth values, written only when the call succeeds.
   */
  public void forwardTokens(IntBuffer tokens, int rows, FloatBuffer out) {
    IntBuffer in = Buffers.in(tokens);
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_session_forward_tokens(u.ptr(), in, checkRows(rows), dst.buffer));
    }
    dst.finish();
  }

  /** Forward over rows rows of hidden states (rows * inputWidth); rows * outputWidth out. */
  public float[] forwardHidden(float[] in, int rows) {
    in = in == null ? new float[0] : in; // the library refuses it on every rank
    float[] out = io.outputFor(rows, in.length);
    forwardHidden(FloatBuffer.wrap(in), rows, FloatBuffer.wrap(out));
    return out;
  }

  /** As {@link #forwardTokens(IntBuffer, int, FloatBuffer)}, from hidden states. */
  public void forwardHidden(FloatBuffer in, int rows, FloatBuffer out) {
    FloatBuffer src = Buffers.in(in);
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_session_forward_hidden(u.ptr(), src, checkRows(rows), dst.buffer));
    }
    dst.finish();
  }

  /**
   * Forward over a padded batch of token ids: rowMask holds one value per row, true for a row that
   * takes part and false for padding. A padding row's ids are not read (a pad id outside the
   * vocabulary is fine); it is not routed or counted, its output row is zero, and it takes no
   * part in backward or backwardLoss. The other rows get exactly the outputs of a pass over them
   * alone. A mask of another length than rows is an error.
   */
  public float[] forwardTokensMasked(int[] tokens, boolean[] rowMask, int rows) {
    tokens = tokens == null ? new int[0] : tokens; // the library refuses it on every rank
    float[] out = io.outputFor(rows, tokens.length);
    forwardTokensMasked(IntBuffer.wrap(tokens), mask(rowMask), rows, FloatBuffer.wrap(out));
    return out;
  }

  /**
   * As {@link #forwardTokensMasked(int[], boolean[], int)}, from and into buffers of any kind (see
   * the class comment); rowMask holds one byte per row, nonzero for a row that takes part.
   */
  public void forwardTokensMasked(IntBuffer tokens, ByteBuffer rowMask, int rows, FloatBuffer out) {
    IntBuffer in = Buffers.in(tokens);
    ByteBuffer mask = Buffers.in(rowMask);
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_session_forward_tokens_masked(
              u.ptr(), in, mask, checkRows(rows), dst.buffer));
    }
    dst.finish();
  }

  /**
   * As {@link #forwardTokensMasked(int[], boolean[], int)}, from hidden states: a padding row's
   * values are not read (NaN is fine), and backward gives it a zero input gradient.
   */
  public float[] forwardHiddenMasked(float[] in, boolean[] rowMask, int rows) {
    in = in == null ? new float[0] : in; // the library refuses it on every rank
    float[] out = io.outputFor(rows, in.length);
    forwardHiddenMasked(FloatBuffer.wrap(in), mask(rowMask), rows, FloatBuffer.wrap(out));
    return out;
  }

  /**
   * As {@link #forwardTokensMasked(IntBuffer, ByteBuffer, int, FloatBuffer)}, from hidden states.
   */
  public void forwardHiddenMasked(FloatBuffer in, ByteBuffer rowMask, int rows, FloatBuffer out) {
    FloatBuffer src = Buffers.in(in);
    ByteBuffer mask = Buffers.in(rowMask);
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_session_forward_hidden_masked(
              u.ptr(), src, mask, checkRows(rows), dst.buffer));
    }
    dst.finish();
  }

  // ---- Metrics -------------------------------------------------------------------------------

  /** Tokens per expert of MoE layer `layer` in scope ({@code CapiConstants.MOERT_COUNTS_*}). */
  public long[] expertCounts(int layer, int scope) {
    long[] counts = new long[numExperts(layer)];
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_session_expert_counts(u.ptr(), layer, scope, LongBuffer.wrap(counts)));
    }
    return counts;
  }

  /**
   * MaxVio of MoE layer `layer` in scope, or the mean over MoE layers with
   * {@code CapiConstants.MOERT_ALL_LAYERS}; 0 when nothing was counted.
   */
  public double maxVio(long layer, int scope) {
    long index = checkUint32("layer", layer);
    try (Use u = use()) {
      double[] out = new double[1];
      MoertException.check(Capi.moert_session_max_vio(u.ptr(), index, scope, out));
      return out[0];
    }
  }

  /**
   * Where the time of a session over several ranks goes ({@link SessionOptions#communicator}),
   * summed over its MoE layers' passes since its creation or the last {@link #resetMetrics()}. The
   * waits are the communication that computation did not hide: compare with a session created
   * with "ep_overlap" "false" to see what overlap hides. All zero for a session alone.
   *
   * @param dispatch waiting for tokens (and output gradients) to arrive
   * @param combine waiting for the experts' results to come back
   * @param experts computing this rank's routed experts
   * @param gradients combining gradients across ranks after each backward
   */
  public record Profile(
      Duration dispatch, Duration combine, Duration experts, Duration gradients) {}

  /** This session's {@link Profile}. */
  public Profile profile() {
    double[] seconds = new double[CapiConstants.MOERT_PROFILE_COUNT];
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_profile(u.ptr(), DoubleBuffer.wrap(seconds)));
    }
    return new Profile(
        duration(seconds[CapiConstants.MOERT_PROFILE_DISPATCH]),
        duration(seconds[CapiConstants.MOERT_PROFILE_COMBINE]),
        duration(seconds[CapiConstants.MOERT_PROFILE_EXPERTS]),
        duration(seconds[CapiConstants.MOERT_PROFILE_GRADIENTS]));
  }

  private static Duration duration(double seconds) {
    return Duration.ofNanos((long) (seconds * 1e9));
  }

  /** Zeroes the MOERT_COUNTS_EVAL counts of every MoE layer, and the {@link Profile}. */
  public void resetMetrics() {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_reset_metrics(u.ptr()));
    }
  }

  // ---- Training ------------------------------------------------------------------------------

  /**
   * Cross-entropy of the last training forward pass's logits against targets (one id per row)
   * plus the auxiliary balancing losses; accumulates every gradient and returns the loss. The
   * cross-entropy is the mean over the rows that take part (not padding of a masked pass) whose
   * target is not {@code CapiConstants.MOERT_IGNORE_TARGET}.
   */
  public double backwardLoss(int[] targets) {
    return backwardLoss(Buffers.wrap(targets));
  }

  /** As {@link #backwardLoss(int[])}, from a buffer. */
  public double backwardLoss(IntBuffer targets) {
    IntBuffer src = Buffers.in(targets);
    try (Use u = use()) {
      double[] loss = new double[1];
      MoertException.check(Capi.moert_session_backward_loss(u.ptr(), src, loss));
      return loss[0];
    }
  }

  /**
   * Back-propagates gradOut (gradient of the last training forward pass's outputs) and returns the
   * auxiliary balancing loss; gradIn, when not null, receives the input gradient (hidden-state
   * models only).
   */
  public double backward(float[] gradOut, float[] gradIn) {
    return backward(Buffers.wrap(gradOut), Buffers.wrap(gradIn));
  }

  /** As {@link #backward(float[], float[])}, with buffers. */
  public double backward(FloatBuffer gradOut, FloatBuffer gradIn) {
    FloatBuffer src = Buffers.in(gradOut);
    Buffers.FloatOut dst = gradIn == null ? null : new Buffers.FloatOut(gradIn);
    try (Use u = use()) {
      double[] aux = new double[1];
      MoertException.check(
          Capi.moert_session_backward(u.ptr(), src, dst == null ? null : dst.buffer, aux));
      if (dst != null) {
        dst.finish();
      }
      return aux[0];
    }
  }

  /** Zeroes the accumulated gradients and the micro-batch count. */
  public void zeroGrad() {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_zero_grad(u.ptr()));
    }
  }

  /**
   * One optimizer step, then the loss-free bias update. A step made and counted before the call
   * failed (an update that took a parameter past the fp32 range, {@code MOERT_ERR_NUMERIC}, for
   * one) throws a {@link StepMadeException}, which holds its figures.
   */
  public Step step() {
    try (Use u = use()) {
      // moert.h writes both only for a step that was made; NaN is no learning rate.
      double[] lr = {Double.NaN};
      double[] norm = {Double.NaN};
      SWIGTYPE_p_moert_status status = Capi.moert_session_step(u.ptr(), lr, norm);
      if (status != null && !Double.isNaN(lr[0])) {
        try {
          throw new StepMadeException(
              Capi.moert_status_code(status),
              Capi.moert_status_message(status),
              new Step(lr[0], norm[0]));
        } finally {
          Capi.moert_status_free(status);
        }
      }
      MoertException.check(status);
      return new Step(lr[0], norm[0]);
    }
  }

  /** Optimizer steps taken (restored from checkpoints). */
  public long stepCount() {
    try (Use u = use()) {
      long[] out = new long[1];
      MoertException.check(Capi.moert_session_step_count(u.ptr(), out));
      return out[0];
    }
  }

  /** Evaluation mode (true) or training (false). */
  public void setEval(boolean eval) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_eval(u.ptr(), eval ? 1 : 0));
    }
  }

  /**
   * A knob by name (see moert.h), for this session from now on; training knobs need a training
   * session.
   */
  public void setConfig(String key, String value) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_config(u.ptr(), key, value));
    }
  }

  /** Number of trainable parameter tensors. */
  public int numParameters() {
    try (Use u = use()) {
      int[] out = new int[1];
      MoertException.check(Capi.moert_session_num_parameters(u.ptr(), out));
      return out[0];
    }
  }

  /** Trainable parameter i. */
  public Parameter parameter(int i) {
    long index = checkUint32("parameter index", i);
    try (Use u = use()) {
      String[] name = new String[1];
      long[] count = new long[1];
      MoertException.check(Capi.moert_session_parameter_info(u.ptr(), index, name, count));
      return new Parameter(name[0], count[0]);
    }
  }

  /** Every trainable parameter. */
  public Parameter[] parameters() {
    Parameter[] all = new Parameter[numParameters()];
    for (int i = 0; i < all.length; i++) {
      all[i] = parameter(i);
    }
    return all;
  }

  /** A copy of parameter `name` (row-major). */
  public float[] getParameter(String name) {
    float[] out = new float[numel(name)];
    getParameter(name, Buffers.wrap(out));
    return out;
  }

  /** Copies parameter `name` into out (exactly its element count remaining). */
  public void getParameter(String name, FloatBuffer out) {
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_get_parameter(u.ptr(), name, dst.buffer));
    }
    dst.finish();
  }

  /** Writes parameter `name`; NaN or infinity is refused (MOERT_ERR_NUMERIC). */
  public void setParameter(String name, float[] values) {
    setParameter(name, Buffers.wrap(values));
  }

  /** As {@link #setParameter(String, float[])}, from a buffer. */
  public void setParameter(String name, FloatBuffer values) {
    FloatBuffer src = Buffers.in(values);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_parameter(u.ptr(), name, src));
    }
  }

  /** A copy of the accumulated gradient of parameter `name`. */
  public float[] getGradient(String name) {
    float[] out = new float[numel(name)];
    getGradient(name, Buffers.wrap(out));
    return out;
  }

  /** Copies the accumulated gradient of parameter `name` into out. */
  public void getGradient(String name, FloatBuffer out) {
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_get_gradient(u.ptr(), name, dst.buffer));
    }
    dst.finish();
  }

  /** Writes the accumulated gradient of parameter `name`. */
  public void setGradient(String name, float[] values) {
    setGradient(name, Buffers.wrap(values));
  }

  /** As {@link #setGradient(String, float[])}, from a buffer. */
  public void setGradient(String name, FloatBuffer values) {
    FloatBuffer src = Buffers.in(values);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_gradient(u.ptr(), name, src));
    }
  }

  /** The loss-free balancing bias of MoE layer `layer`, one value per routed expert. */
  public float[] expertBias(int layer) {
    float[] out = new float[numExperts(layer)];
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_get_expert_bias(u.ptr(), layer, FloatBuffer.wrap(out)));
    }
    return out;
  }

  /** Sets the loss-free balancing bias of MoE layer `layer`. */
  public void setExpertBias(int layer, float[] bias) {
    long index = checkUint32("layer", layer);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_expert_bias(u.ptr(), index, Buffers.wrap(bias)));
    }
  }

  /** Bias update rate gamma of MoE layer `layer` or MOERT_ALL_LAYERS, from the next step on. */
  public void setBiasUpdateRate(long layer, double gamma) {
    long index = checkUint32("layer", layer);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_bias_update_rate(u.ptr(), index, gamma));
    }
  }

  /** Freezes or thaws the bias of MoE layer `layer` or MOERT_ALL_LAYERS. */
  public void setBiasFrozen(long layer, boolean frozen) {
    long index = checkUint32("layer", layer);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_set_bias_frozen(u.ptr(), index, frozen ? 1 : 0));
    }
  }

  // ---- Checkpoints ---------------------------------------------------------------------------

  /** Writes a checkpoint atomically; on MOERT_ERR_IO the previous file at path is intact. */
  public void save(String path) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_save(u.ptr(), path));
    }
  }

  /** Restores a checkpoint; a corrupt or foreign file is refused and the state is kept. */
  public void load(String path) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_load(u.ptr(), path));
    }
  }

  // ---- Helpers -------------------------------------------------------------------------------

  private static long checkRows(int rows) {
    // A negative count, which the C ABI cannot take, goes as 0: the library refuses it alike
    // on every rank.
    return Math.max(rows, 0);
  }

  /** One byte per row: 1 for a row that takes part, 0 for padding. */
  private static ByteBuffer mask(boolean[] rows) {
    if (rows == null) {
      return null; // the library refuses it (on every rank)
    }
    byte[] bytes = new byte[rows.length];
    for (int i = 0; i < rows.length; i++) {
      bytes[i] = (byte) (rows[i] ? 1 : 0);
    }
    return ByteBuffer.wrap(bytes);
  }

  private int numExperts(int layer) {
    Integer n = experts.get(layer);
    if (n == null) {
      throw new MoertException(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          "layer " + layer + " is not a MoE layer (the model's MoE layers: "
              + new java.util.TreeSet<>(experts.keySet()) + ")");
    }
    return n;
  }

  private int numel(String name) {
    Map<String, Long> table = numel;
    if (table == null) {
      table = new HashMap<>();
      for (Parameter p : parameters()) {
        table.put(p.name(), p.numel());
      }
      numel = table;
    }
    Long n = table.get(name);
    if (n == null) {
      throw new MoertException(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "no parameter named '" + name + "'");
    }
    return Math.toIntExact(n);
  }
}

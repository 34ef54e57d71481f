package dev.moert;

import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.LongBuffer;
import java.time.Duration;

/**
 * Serves inference to many threads at once. Each call blocks while the batcher gathers the calls
 * that arrive within the bounded wait, up to the row cap, into one forward pass on a pool of
 * sessions over the model, and returns exactly the caller's own outputs, or throws the caller's
 * own error: the outputs a {@link Session} would return for those rows alone (bit for bit on the
 * CPU; see moert.h). One caller's bad input fails that caller alone.
 *
 * <p>Buffers of every kind are accepted, as by {@link Session}. {@link #close()} waits for the
 * requests in flight.
 */
public final class Batcher extends NativeHandle<SWIGTYPE_p_moert_batcher> {
  /** How one request was served. */
  public record RequestStats(
      Duration queue, Duration run, long batchRows, long batchRequests, int session) {}

  /** A batcher's cumulative figures since its creation. */
  public record Counters(
      long requests,
      long failed,
      long batches,
      long rows,
      Duration queue,
      Duration run,
      long isolated) {
    /** rows / batches, 0 before the first pass. */
    public double meanBatchRows() {
      return batches == 0 ? 0 : (double) rows / batches;
    }
  }

  private final Model.Io io;

  private Batcher(SWIGTYPE_p_moert_batcher ptr, Model.Io io) {
    super("batcher", ptr, () -> Capi.moert_batcher_free(ptr));
    this.io = io;
  }

  /** A batcher over model with options (null: defaults); the model may be closed after. */
  public static Batcher create(Model model, BatcherOptions options) {
    Moert.load();
    Model.Io io = model.io();
    SWIGTYPE_p_moert_batcher[] out = new SWIGTYPE_p_moert_batcher[1];
    try (var m = model.use();
        var o = options == null ? null : options.use()) {
      MoertException.check(Capi.moert_batcher_create(m.ptr(), o == null ? null : o.ptr(), out));
    }
    return new Batcher(out[0], io);
  }

  /** What a request takes and returns. */
  public Model.Io io() {
    return io;
  }

  private static RequestStats stats(long[] s) {
    return new RequestStats(
        Duration.ofNanos(s[CapiConstants.MOERT_REQUEST_QUEUE_NS]),
        Duration.ofNanos(s[CapiConstants.MOERT_REQUEST_RUN_NS]),
        s[CapiConstants.MOERT_REQUEST_BATCH_ROWS],
        s[CapiConstants.MOERT_REQUEST_BATCH_REQUESTS],
        (int) s[CapiConstants.MOERT_REQUEST_SESSION]);
  }

  private static long checkRows(int rows) {
    if (rows < 0) {
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "rows " + rows);
    }
    return rows;
  }

  /** One request of rows rows of token ids; rows * outputWidth values out. */
  public float[] forwardTokens(int[] tokens, int rows) {
    float[] out = new float[Math.multiplyExact((int) checkRows(rows), io.outputWidth())];
    forwardTokens(IntBuffer.wrap(tokens), rows, FloatBuffer.wrap(out));
    return out;
  }

  /** One request from and into buffers; out is written only when the call succeeds. */
  public RequestStats forwardTokens(IntBuffer tokens, int rows, FloatBuffer out) {
    IntBuffer in = Buffers.in(tokens);
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    long[] s = new long[CapiConstants.MOERT_REQUEST_STATS];
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_batcher_forward_tokens(
              u.ptr(), in, checkRows(rows), dst.buffer, LongBuffer.wrap(s)));
    }
    dst.finish();
    return stats(s);
  }

  /** One request of rows rows of hidden states; rows * outputWidth values out. */
  public float[] forwardHidden(float[] in, int rows) {
    float[] out = new float[Math.multiplyExact((int) checkRows(rows), io.outputWidth())];
    forwardHidden(FloatBuffer.wrap(in), rows, FloatBuffer.wrap(out));
    return out;
  }

  /** As {@link #forwardTokens(IntBuffer, int, FloatBuffer)}, from hidden states. */
  public RequestStats forwardHidden(FloatBuffer in, int rows, FloatBuffer out) {
    FloatBuffer src = Buffers.in(in);
    Buffers.FloatOut dst = new Buffers.FloatOut(out);
    long[] s = new long[CapiConstants.MOERT_REQUEST_STATS];
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_batcher_forward_hidden(
              u.ptr(), src, checkRows(rows), dst.buffer, LongBuffer.wrap(s)));
    }
    dst.finish();
    return stats(s);
  }

  /** The cumulative figures (a consistent snapshot). */
  public Counters counters() {
    long[] c = new long[CapiConstants.MOERT_BATCHER_COUNTERS];
    try (Use u = use()) {
      MoertException.check(Capi.moert_batcher_counters(u.ptr(), LongBuffer.wrap(c)));
    }
    return new Counters(
        c[CapiConstants.MOERT_BATCHER_REQUESTS],
        c[CapiConstants.MOERT_BATCHER_FAILED],
        c[CapiConstants.MOERT_BATCHER_BATCHES],
        c[CapiConstants.MOERT_BATCHER_ROWS],
        Duration.ofNanos(c[CapiConstants.MOERT_BATCHER_QUEUE_NS]),
        Duration.ofNanos(c[CapiConstants.MOERT_BATCHER_RUN_NS]),
        c[CapiConstants.MOERT_BATCHER_ISOLATED]);
  }
}

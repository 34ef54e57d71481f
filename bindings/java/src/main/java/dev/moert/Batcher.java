package dev.moert;

import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.LongBuffer;
import java.time.Duration;
import java.util.Arrays;
import java.util.concurrent.CompletableFuture;

/**
 * Serves inference to many threads at once. Each call blocks while the batcher gathers the calls
 * that arrive within the bounded wait, up to the row cap, into one forward pass on a pool of
 * sessions over the model, and returns exactly the caller's own outputs, or throws the caller's
 * own error: the outputs a {@link Session} would return for those rows alone (bit for bit on the
 * CPU; see moert.h). One caller's bad input fails that caller alone.
 *
 * <p>Requests are either blocking ({@code forward*}: the calling thread waits for its pass) or
 * submitted ({@code submit*}: a {@link CompletableFuture} returned at once, so a caller with many
 * requests in flight holds no thread for each). Both kinds share the same queue and passes.
 *
 * <p>Buffers of every kind are accepted, as by {@link Session}. {@link #close()} waits for the
 * blocking calls in flight and for the passes running; submitted requests still queued then are
 * answered with {@code MOERT_ERR_INVALID_STATE}, so every returned future completes.
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

  /**
   * A submitted request's answer: its outputs (rows * outputWidth values, as the blocking call
   * would write them; the array belongs to the caller) and how it was served. Equality compares
   * the array by reference, as for any record.
   */
  public record Result(float[] outputs, RequestStats stats) {}

  /** The batcher whose future the current thread is completing, if any (see checkClose). */
  private static final ThreadLocal<Batcher> ANSWERING = new ThreadLocal<>();

  /**
   * A submitted request, handed to the JNI layer as the C callback's user data (moert.i): it
   * calls {@link #complete} exactly once, on the thread that answers the request. It holds the
   * batcher, so a batcher with requests in flight is never freed by the Cleaner under them.
   */
  private static final class Pending {
    private final CompletableFuture<Result> future = new CompletableFuture<>();
    private final Batcher batcher;

    Pending(Batcher batcher) {
      this.batcher = batcher;
    }

    /**
     * Called by the JNI layer: code and message (UTF-8) of the request's status, its outputs
     * (null on error, or when they could not be copied into Java) and its figures.
     */
    void complete(int code, byte[] message, float[] out, long[] figures) {
      Batcher previous = ANSWERING.get();
      ANSWERING.set(batcher);
      try {
        if (code != CapiConstants.MOERT_OK) {
          future.completeExceptionally(new MoertException(code, Capi.string(message)));
        } else if (out == null) {
          future.completeExceptionally(
              new MoertException(
                  CapiConstants.MOERT_ERR_OUT_OF_MEMORY,
                  "the request's outputs could not be copied into Java"));
        } else {
          future.complete(new Result(out, stats(figures)));
        }
      } catch (Throwable t) {
        future.completeExceptionally(t);
      } finally {
        if (previous == null) {
          ANSWERING.remove();
        } else {
          ANSWERING.set(previous);
        }
      }
    }

    /** Figures as a RequestStats; -1 for any the library did not give. */
    private static RequestStats stats(long[] figures) {
      long[] s = new long[CapiConstants.MOERT_REQUEST_STATS];
      Arrays.fill(s, -1);
      if (figures != null) {
        System.arraycopy(figures, 0, s, 0, Math.min(figures.length, s.length));
      }
      return Batcher.stats(s);
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
    Model.Io io = model == null ? null : model.io(); // null: the library refuses it
    SWIGTYPE_p_moert_batcher[] out = new SWIGTYPE_p_moert_batcher[1];
    try (var m = model == null ? null : model.use();
        var o = options == null ? null : options.use()) {
      MoertException.check(
          Capi.moert_batcher_create(m == null ? null : m.ptr(), o == null ? null : o.ptr(), out));
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
    // A negative count, which the C ABI cannot take, goes as 0: the library refuses it alike
    // on every rank.
    return Math.max(rows, 0);
  }

  /** One request of rows rows of token ids; rows * outputWidth values out. */
  public float[] forwardTokens(int[] tokens, int rows) {
    tokens = tokens == null ? new int[0] : tokens; // the library refuses it on every rank
    float[] out = io.outputFor(rows, tokens.length);
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
    in = in == null ? new float[0] : in; // the library refuses it on every rank
    float[] out = io.outputFor(rows, in.length);
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

  /**
   * Submits one request of rows rows of token ids (rows * inputWidth ids) and returns at once,
   * without waiting for its pass: the tokens are copied before this returns (the array may be
   * reused). The request is validated here, as by {@link #forwardTokens(int[], int)}: a bad one
   * throws its {@link MoertException} now, and no future exists for it.
   *
   * <p>The future completes exactly once: with the request's {@link Result} (what {@link
   * #forwardTokens(int[], int)} would return for the same rows), or exceptionally with a {@link
   * MoertException} carrying the library's code and message (an error of the pass, or {@code
   * MOERT_ERR_INVALID_STATE} for a request still queued when {@link #close()} runs).
   *
   * <p>Threads: the future is completed on one of the batcher's threads (named {@code
   * moert-batcher}), or, for a request answered by {@link #close()}, on the thread calling
   * close(). Stages attached with the non-async methods ({@code thenApply}, {@code whenComplete},
   * ...) to a future not yet complete run on that thread, and while they run that session takes no
   * new pass: keep them short and never block in them (a blocking {@code forward*} call on this
   * batcher there throws {@code MOERT_ERR_INVALID_STATE}: it would wait for the very session it
   * holds). Use the {@code *Async} variants with an executor for
   * anything more. Closing this batcher from such a stage on one of its threads throws {@code
   * MOERT_ERR_INVALID_STATE} (the threads cannot stop themselves); submitting from one is fine,
   * except while close() runs: a submit then throws {@code MOERT_ERR_INVALID_STATE} at once,
   * without waiting for close(). Cancelling the future does not withdraw the request; its answer
   * is dropped.
   *
   * @throws MoertException the request is invalid (sizes, the row cap, token ids), or the batcher
   *     is closed ({@code MOERT_ERR_INVALID_STATE})
   */
  public CompletableFuture<Result> submitTokens(int[] tokens, int rows) {
    return submitTokens(Buffers.wrap(tokens), rows);
  }

  /**
   * As {@link #submitTokens(int[], int)}, from a buffer of any kind: its remaining ids are the
   * request's; they are copied before this returns, and the buffer's position is not moved.
   */
  public CompletableFuture<Result> submitTokens(IntBuffer tokens, int rows) {
    IntBuffer in = Buffers.in(tokens);
    Pending request = new Pending(this);
    try (Use u = tryUse()) {
      MoertException.check(
          Capi.moert_batcher_submit_tokens(u.ptr(), in, checkRows(rows), request));
    }
    return request.future;
  }

  /**
   * As {@link #submitTokens(int[], int)}, over rows rows of hidden states (rows * inputWidth
   * values; a model taking hidden states): answers equal {@link #forwardHidden(float[], int)}'s.
   */
  public CompletableFuture<Result> submitHidden(float[] in, int rows) {
    return submitHidden(Buffers.wrap(in), rows);
  }

  /**
   * As {@link #submitHidden(float[], int)}, from a buffer of any kind: its remaining values are
   * the request's; they are copied before this returns, and the buffer's position is not moved.
   */
  public CompletableFuture<Result> submitHidden(FloatBuffer in, int rows) {
    FloatBuffer src = Buffers.in(in);
    Pending request = new Pending(this);
    try (Use u = tryUse()) {
      MoertException.check(
          Capi.moert_batcher_submit_hidden(u.ptr(), src, checkRows(rows), request));
    }
    return request.future;
  }

  /**
   * close() waits for the handle's calls in flight; on one of the batcher's own threads it could
   * wait for a close() elsewhere that waits for this thread. Refused there, although the C library
   * itself accepts a free from a callback (it hands the release to a thread of its own).
   */
  @Override
  void checkClose() {
    if (ANSWERING.get() == this) {
      throw new MoertException(
          CapiConstants.MOERT_ERR_INVALID_STATE,
          "a batcher cannot be closed from a stage its own thread runs (use an *Async stage)");
    }
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

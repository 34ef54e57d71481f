package dev.moert;

import java.time.Duration;

/**
 * Options for a {@link Batcher}: defaults are 1 session, at most 256 rows per forward pass, no
 * wait, default session options. Not to be modified from two threads at once. The setters return
 * this, for chaining.
 */
public final class BatcherOptions extends NativeHandle<SWIGTYPE_p_moert_batcher_options> {
  private BatcherOptions(SWIGTYPE_p_moert_batcher_options ptr) {
    super("batcher options", ptr, () -> Capi.moert_batcher_options_free(ptr));
  }

  /** Options with the defaults. */
  public static BatcherOptions create() {
    Moert.load();
    SWIGTYPE_p_moert_batcher_options[] out = new SWIGTYPE_p_moert_batcher_options[1];
    MoertException.check(Capi.moert_batcher_options_create(out));
    return new BatcherOptions(out[0]);
  }

  /**
   * Inference sessions in the pool, 1 to 256: how many forward passes run at once. Sessions times
   * threads per session should be about the machine's cores.
   */
  public BatcherOptions sessions(int sessions) {
    long n = checkUint32("sessions", sessions);
    try (Use u = use()) {
      MoertException.check(Capi.moert_batcher_options_set_sessions(u.ptr(), n));
    }
    return this;
  }

  /** The row cap, 1 to 2^20: the most rows one pass gathers and one request may have. */
  public BatcherOptions maxBatchRows(long rows) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_batcher_options_set_max_batch_rows(u.ptr(), rows));
    }
    return this;
  }

  /**
   * The most rows that may wait for a pass, 0 (the default: no bound) to 2^40, and at least the
   * row cap when not 0: a request that would queue more fails at once with MOERT_ERR_LIMIT, so
   * that a service under overload sheds load instead of queueing without end.
   */
  public BatcherOptions maxQueuedRows(long rows) {
    if (rows < 0) {
      throw new MoertException(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "max queued rows " + rows + " is negative");
    }
    try (Use u = use()) {
      MoertException.check(Capi.moert_batcher_options_set_max_queued_rows(u.ptr(), rows));
    }
    return this;
  }

  /**
   * The bounded wait, 0 to 1 s (microsecond resolution): how long a free session holding fewer
   * rows than the cap waits for more after the oldest queued request arrived.
   */
  public BatcherOptions maxWait(Duration wait) {
    if (wait == null) {
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "max wait is null");
    }
    if (wait.isNegative()) {
      throw new MoertException(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "max wait " + wait + " is negative");
    }
    long micros = wait.getSeconds() > 1 ? Long.MAX_VALUE : wait.toNanos() / 1000;
    try (Use u = use()) {
      MoertException.check(Capi.moert_batcher_options_set_max_wait_us(u.ptr(), micros));
    }
    return this;
  }

  /** The options every pool session is created with (copied); training mode is refused. */
  public BatcherOptions sessionOptions(SessionOptions options) {
    try (Use u = use();
        var o = options == null ? null : options.use()) {
      MoertException.check(
          Capi.moert_batcher_options_set_session_options(u.ptr(), o == null ? null : o.ptr()));
    }
    return this;
  }
}

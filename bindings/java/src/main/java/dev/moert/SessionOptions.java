package dev.moert;

/**
 * Options for a {@link Session}: defaults are CPU, 1 thread, seed 0, inference mode. Not to be
 * modified from two threads at once. The setters return this, for chaining.
 */
public final class SessionOptions extends NativeHandle<SWIGTYPE_p_moert_session_options> {

  private SessionOptions(SWIGTYPE_p_moert_session_options ptr) {
    super("session options", ptr, () -> Capi.moert_session_options_free(ptr));
  }

  /** Options with the defaults. */
  public static SessionOptions create() {
    Moert.load();
    SWIGTYPE_p_moert_session_options[] out = new SWIGTYPE_p_moert_session_options[1];
    MoertException.check(Capi.moert_session_options_create(out));
    return new SessionOptions(out[0]);
  }

  /**
   * Device ({@code CapiConstants.MOERT_DEVICE_*}) and index; CUDA is refused by session creation
   * (MOERT_ERR_UNSUPPORTED) where no CUDA backend can be loaded.
   */
  public SessionOptions device(int device, int index) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_options_set_device(u.ptr(), device, index));
    }
    return this;
  }

  /** Worker threads for the session's CPU work, 1 to 1024. */
  public SessionOptions threads(int threads) {
    long n = checkUint32("threads", threads);
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_options_set_threads(u.ptr(), n));
    }
    return this;
  }

  /** Seed for everything random the session does (an unsigned 64-bit value). */
  public SessionOptions seed(long seed) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_options_set_seed(u.ptr(), seed));
    }
    return this;
  }

  /** {@code CapiConstants.MOERT_MODE_INFERENCE} or {@code MOERT_MODE_TRAINING}. */
  public SessionOptions mode(int mode) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_options_set_mode(u.ptr(), mode));
    }
    return this;
  }

  /** A backend or training knob by name (see moert.h); unknown keys are an error. */
  public SessionOptions config(String key, String value) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_session_options_set_config(u.ptr(), key, value));
    }
    return this;
  }

  /**
   * Attaches a communicator with an expert-parallel size (>= 1, dividing the communicator's size)
   * for the sessions created from these options; the options keep their own reference. null
   * with 1 detaches it.
   */
  public SessionOptions communicator(Communicator comm, int expertParallel) {
    if (comm == null) {
      try (Use u = use()) {
        MoertException.check(Capi.moert_session_options_set_comm(u.ptr(), null, expertParallel));
      }
      return this;
    }
    try (Use u = use();
        NativeHandle<SWIGTYPE_p_moert_comm>.Use c = comm.use()) {
      MoertException.check(Capi.moert_session_options_set_comm(u.ptr(), c.ptr(), expertParallel));
    }
    return this;
  }
}

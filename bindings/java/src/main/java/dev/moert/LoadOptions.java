package dev.moert;

import java.nio.ByteBuffer;
import java.nio.file.Path;

/**
 * Limits on what loading a file may cost, for services that load files they did not write. They
 * are checked on the totals the description declares, before anything is allocated or read for
 * the model; a load over one throws {@link MoertException} with {@code
 * CapiConstants.MOERT_ERR_LIMIT}. Defaults (also those of {@link Model#load(String)}): a model
 * may hold 1 GiB of tensors (counted as fp32, whatever their source) and a load may read 4 GiB.
 * Not to be modified from two threads at once. The setters return this, for chaining.
 */
public final class LoadOptions extends NativeHandle<SWIGTYPE_p_moert_load_options> {

  private LoadOptions(SWIGTYPE_p_moert_load_options ptr) {
    super("load options", ptr, () -> Capi.moert_load_options_free(ptr));
  }

  /** Load options with the defaults. */
  public static LoadOptions create() {
    Moert.load();
    SWIGTYPE_p_moert_load_options[] out = new SWIGTYPE_p_moert_load_options[1];
    MoertException.check(Capi.moert_load_options_create(out));
    return new LoadOptions(out[0]);
  }

  /**
   * The bytes a loaded model may hold (an unsigned 64-bit value): its tensors as fp32, and a
   * checkpoint's training state when a session loads it; never more than physical memory.
   */
  public LoadOptions maxMemory(long bytes) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_load_options_set_max_memory(u.ptr(), bytes));
    }
    return this;
  }

  /** The bytes a load may read (unsigned): the description and the external data it uses. */
  public LoadOptions maxFileBytes(long bytes) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_load_options_set_max_file_bytes(u.ptr(), bytes));
    }
    return this;
  }

  /**
   * When {@code on}, an external data file (a checkpoint's included) reached by a way out of the
   * model's directory is refused ({@code MOERT_ERR_INVALID_MODEL}): without it a link there named
   * as the data file makes any readable file the weights. Off by default, because content stores
   * such as the Hugging Face hub cache link every file from elsewhere. moert.h ({@code
   * moert_load_options}) says how it is checked, and what differs without openat2.
   */
  public LoadOptions confineExternalData(boolean on) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_load_options_set_confine_external_data(u.ptr(), on ? 1 : 0));
    }
    return this;
  }

  /**
   * When {@code on}, a load reads the description alone: no tensor is read or initialised and the
   * external data file is not opened, so a model of any size loads in a scan of its description.
   * Such a model answers the calls that describe it (layers, parameter counts, tensor info,
   * resident bytes: what a full load would hold) and refuses sessions, batchers, saves and FP8
   * quantization ({@code MOERT_ERR_INVALID_ARGUMENT}). moert.h ({@code
   * moert_load_options_set_description_only}) says what is and is not checked.
   */
  public LoadOptions descriptionOnly(boolean on) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_load_options_set_description_only(u.ptr(), on ? 1 : 0));
    }
    return this;
  }

  /** As {@link Model#load(Path)}, within these limits. */
  public Model loadModel(Path path) {
    return loadModel(path.toString());
  }

  /** As {@link Model#load(String)}, within these limits. */
  public Model loadModel(String path) {
    SWIGTYPE_p_moert_model[] out = new SWIGTYPE_p_moert_model[1];
    try (Use u = use()) {
      MoertException.check(Capi.moert_model_load_file_with_options(path, u.ptr(), out));
    }
    return new Model(out[0]);
  }

  /** As {@link Model#fromBuffer(ByteBuffer, String)}, within these limits. */
  public Model loadModel(ByteBuffer data, String externalDir) {
    SWIGTYPE_p_moert_model[] out = new SWIGTYPE_p_moert_model[1];
    try (Use u = use()) {
      MoertException.check(
          Capi.moert_model_load_buffer_with_options(
              data == null ? null : data.slice(), externalDir, u.ptr(), out));
    }
    return new Model(out[0]);
  }

  /**
   * As {@link Session#load(String)}, within these limits as well as the session's own (what its
   * architecture can hold).
   */
  public void loadCheckpoint(Session session, String path) {
    // A null session goes to the library, which refuses it.
    try (var s = session == null ? null : session.use();
        Use u = use()) {
      MoertException.check(
          Capi.moert_session_load_with_options(s == null ? null : s.ptr(), path, u.ptr()));
    }
  }
}

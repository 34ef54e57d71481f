package dev.moert;

/**
 * A failed moert call: the status code ({@code CapiConstants.MOERT_ERR_*}) and the library's
 * message, which names what is at fault.
 *
 * <p>Unchecked on purpose: every call of the C ABI can fail (an invalid argument, an allocation,
 * a closed handle), so a checked exception would sit on every method without telling the caller
 * anything, and would not pass through the lambdas and streams that share a {@link Session}
 * across threads. Callers that can recover (a missing or corrupt model file, a checkpoint that
 * cannot be written) catch it and look at {@link #getCode()}.
 */
public class MoertException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  private final int code;

  public MoertException(int code, String message) {
    super(Moert.codeName(code) + ": " + message);
    this.code = code;
  }

  /** The status code, one of {@code CapiConstants.MOERT_ERR_*}. */
  public int getCode() {
    return code;
  }

  /** The code's constant name, e.g. "MOERT_ERR_IO". */
  public String getCodeName() {
    return Moert.codeName(code);
  }

  /** Throws the status as a MoertException when it is an error, and frees it either way. */
  static void check(SWIGTYPE_p_moert_status status) {
    if (status == null) {
      return;
    }
    try {
      throw new MoertException(Capi.moert_status_code(status), Capi.moert_status_message(status));
    } finally {
      Capi.moert_status_free(status);
    }
  }
}

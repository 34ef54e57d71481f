package dev.moert;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;

/**
 * Loads the native library and checks its ABI; versions; helpers for direct buffers.
 *
 * <p>The JNI library (libmoert_jni.so, which links libmoert.so) is loaded from the path in the
 * system property {@code moert.jni.library} when it is set, otherwise by {@code
 * System.loadLibrary("moert_jni")} from {@code java.library.path}. Loading fails with an
 * UnsatisfiedLinkError when the library implements another ABI than the constant this binding
 * was generated with ({@code CapiConstants.MOERT_ABI_VERSION}).
 */
public final class Moert {
  static {
    String path = System.getProperty("moert.jni.library");
    if (path != null && !path.isEmpty()) {
      System.load(path);
    } else {
      System.loadLibrary("moert_jni");
    }
    long abi = Capi.moert_abi_version();
    if (abi != CapiConstants.MOERT_ABI_VERSION) {
      throw new UnsatisfiedLinkError(
          "libmoert implements ABI "
              + abi
              + ", this binding was built for ABI "
              + CapiConstants.MOERT_ABI_VERSION);
    }
  }

  private Moert() {}

  /** Loads the library if it is not yet loaded; every entry point of the binding calls it. */
  static void load() {
    // Running the static initialiser is the whole job.
  }

  /** The ABI major the loaded library implements. */
  public static long abiVersion() {
    return Capi.moert_abi_version();
  }

  /** The loaded library's version, "MAJOR.MINOR.PATCH". */
  public static String version() {
    return Capi.moert_version_string();
  }

  /** Major and minor of the model-description schema the library reads. */
  public static int[] schemaVersion() {
    int[] major = new int[1];
    int[] minor = new int[1];
    Capi.moert_schema_version(major, minor);
    return new int[] {major[0], minor[0]};
  }

  /** The constant name of a status code, "MOERT_ERR_UNKNOWN" for other values. */
  public static String codeName(int code) {
    return Capi.moert_status_code_name(code);
  }

  /**
   * A direct float buffer in native byte order: the zero-copy way to pass values to moert.
   *
   * @throws IllegalArgumentException when {@code count} is negative or its bytes exceed what one
   *     buffer holds (2^31 - 1)
   */
  public static FloatBuffer allocateFloats(int count) {
    return ByteBuffer.allocateDirect(bytes(count, Float.BYTES))
        .order(ByteOrder.nativeOrder())
        .asFloatBuffer();
  }

  /**
   * A direct int buffer in native byte order (token ids, targets).
   *
   * @throws IllegalArgumentException as {@link #allocateFloats}
   */
  public static IntBuffer allocateInts(int count) {
    return ByteBuffer.allocateDirect(bytes(count, Integer.BYTES))
        .order(ByteOrder.nativeOrder())
        .asIntBuffer();
  }

  // A buffer's size in bytes, refused where the int product would wrap around.
  private static int bytes(int count, int size) {
    if (count < 0 || count > Integer.MAX_VALUE / size)
      throw new IllegalArgumentException(
          count + " values of " + size + " bytes do not fit in one buffer (2^31 - 1 bytes)");
    return count * size;
  }
}

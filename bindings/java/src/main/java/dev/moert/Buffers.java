package dev.moert;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.ReadOnlyBufferException;

/**
 * Caller buffers as the native side can use them. Every NIO buffer is accepted: heap (array
 * backed), direct, read-only (as inputs), sliced, duplicated, views of a ByteBuffer in either byte
 * order. A buffer always covers its remaining elements, and its position is never moved.
 *
 * <p>The JNI layer takes two kinds directly: direct buffers in native byte order (in place, by
 * their address, copied only when it is not aligned to the element size) and writable
 * array-backed ones (their window of the array, the remaining elements only, copied to native
 * memory for the call and, for an output, back after a successful call: other threads' writes to
 * the rest of the array are never undone). Every other kind — a read-only buffer, a view of a
 * heap ByteBuffer, a buffer in the other byte order — is copied, with Java's own byte-order
 * conversion, into an array-backed buffer for the call, and outputs are copied back after a
 * successful call. A read-only output is refused with ReadOnlyBufferException.
 */
final class Buffers {
  private Buffers() {}

  private static boolean inPlace(java.nio.Buffer b, ByteOrder order) {
    return b.hasArray() || (b.isDirect() && order == ByteOrder.nativeOrder());
  }

  /** A caller's array as a buffer; null stays null, for the library to refuse (on every rank). */
  static FloatBuffer wrap(float[] a) {
    return a == null ? null : FloatBuffer.wrap(a);
  }

  static IntBuffer wrap(int[] a) {
    return a == null ? null : IntBuffer.wrap(a);
  }

  static FloatBuffer in(FloatBuffer b) {
    if (b == null) {
      return null;
    }
    if (inPlace(b, b.order())) {
      return b.slice();
    }
    float[] copy = new float[b.remaining()];
    b.duplicate().get(copy);
    return FloatBuffer.wrap(copy);
  }

  static IntBuffer in(IntBuffer b) {
    if (b == null) {
      return null;
    }
    if (inPlace(b, b.order())) {
      return b.slice();
    }
    int[] copy = new int[b.remaining()];
    b.duplicate().get(copy);
    return IntBuffer.wrap(copy);
  }

  static ByteBuffer in(ByteBuffer b) {
    if (b == null) {
      return null;
    }
    if (b.hasArray() || b.isDirect()) {
      return b.slice();
    }
    byte[] copy = new byte[b.remaining()];
    b.duplicate().get(copy);
    return ByteBuffer.wrap(copy);
  }

  /** An output: where the native side writes, and how the result reaches the caller's buffer. */
  static final class FloatOut {
    private final FloatBuffer target;
    private final boolean staged;
    final FloatBuffer buffer;

    FloatOut(FloatBuffer target) {
      if (target == null) { // the library refuses it (on every rank)
        this.target = null;
        this.staged = false;
        this.buffer = null;
        return;
      }
      if (target.isReadOnly()) {
        throw new ReadOnlyBufferException();
      }
      this.target = target;
      this.staged = !inPlace(target, target.order());
      this.buffer = staged ? FloatBuffer.allocate(target.remaining()) : target.slice();
    }

    /** After a successful call: copies a staged result into the caller's buffer. */
    void finish() {
      if (staged) {
        target.duplicate().put(buffer.rewind());
      }
    }
  }
}

package dev.moert;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.ReadOnlyBufferException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.IntFunction;
import org.junit.jupiter.api.Assumptions;
import org.junit.jupiter.api.Test;

/**
 * Every kind of NIO buffer Java can make — heap, direct, read-only, sliced, views of a ByteBuffer
 * in both byte orders, at an unaligned offset — as input and output of every entry point that
 * takes caller memory: the answers equal those of plain arrays, positions do not move, outputs
 * outside the remaining range are untouched.
 */
class BuffersTest {
  private static final String MODEL = System.getProperty("moert.test.model");
  private static final String HIDDEN = System.getProperty("moert.test.hidden.model");
  private static final ByteOrder OTHER =
      ByteOrder.nativeOrder() == ByteOrder.LITTLE_ENDIAN
          ? ByteOrder.BIG_ENDIAN
          : ByteOrder.LITTLE_ENDIAN;

  /** A named way to make a float buffer holding `values` from position 3 on. */
  private record Kind(String name, IntFunction<FloatBuffer> make) {}

  private static List<Kind> floatKinds() {
    List<Kind> kinds = new ArrayList<>();
    kinds.add(new Kind("heap", n -> FloatBuffer.allocate(n + 5)));
    kinds.add(new Kind("direct native", n -> Moert.allocateFloats(n + 5)));
    kinds.add(
        new Kind(
            "direct other order",
            n -> ByteBuffer.allocateDirect((n + 5) * 4).order(OTHER).asFloatBuffer()));
    kinds.add(
        new Kind(
            "heap bytes native",
            n -> ByteBuffer.allocate((n + 5) * 4).order(ByteOrder.nativeOrder()).asFloatBuffer()));
    kinds.add(
        new Kind("heap bytes other order", n -> ByteBuffer.allocate((n + 5) * 4).order(OTHER).asFloatBuffer()));
    kinds.add(
        new Kind(
            "direct unaligned",
            n ->
                ByteBuffer.allocateDirect((n + 5) * 4 + 1)
                    .position(1)
                    .slice()
                    .order(ByteOrder.nativeOrder())
                    .asFloatBuffer()));
    kinds.add(new Kind("sliced heap", n -> FloatBuffer.allocate(n + 9).position(4).slice()));
    kinds.add(new Kind("sliced direct", n -> Moert.allocateFloats(n + 9).position(4).slice()));
    return kinds;
  }

  /** values at position 3 of a buffer of `kind`, limit just after them. */
  private static FloatBuffer fill(Kind kind, float[] values) {
    FloatBuffer b = kind.make().apply(values.length);
    b.position(3);
    b.put(values);
    b.position(3).limit(3 + values.length);
    return b;
  }

  private static float[] remaining(FloatBuffer b) {
    float[] out = new float[b.remaining()];
    b.duplicate().get(out);
    return out;
  }

  @Test
  void allocationsWhoseBytesOverflowAreRefused() {
    assertEquals(5, Moert.allocateFloats(5).capacity());
    assertThrows(IllegalArgumentException.class, () -> Moert.allocateFloats(0x40000001));
    assertThrows(IllegalArgumentException.class, () -> Moert.allocateInts(0x40000002));
    assertThrows(IllegalArgumentException.class, () -> Moert.allocateFloats(-1));
  }

  @Test
  void hiddenForwardFromAndIntoEveryKindOfBuffer() {
    try (Model m = Model.load(HIDDEN);
        Session s = Session.create(m, null);
        Batcher b = Batcher.create(m, null)) {
      float[] in = {1f, -0.5f, 0.25f, 2f, 0.125f, 3f, 0.5f, -1f, 0f, 0.75f};
      float[] want = s.forwardHidden(in, 2);
      assertThrows(MoertException.class, m::vocabSize);
      for (Kind inKind : floatKinds()) {
        for (boolean readOnly : new boolean[] {false, true}) {
          FloatBuffer src = fill(inKind, in);
          if (readOnly) {
            src = src.asReadOnlyBuffer();
          }
          for (Kind outKind : floatKinds()) {
            String what = inKind.name() + (readOnly ? " read-only" : "") + " -> " + outKind.name();
            FloatBuffer dst = fill(outKind, new float[10]);
            s.forwardHidden(src, 2, dst);
            assertArrayEquals(want, remaining(dst), what);
            assertEquals(3, src.position(), what);
            assertEquals(3, dst.position(), what);
            assertEquals(0f, dst.get(2), what); // before the remaining range: untouched
            FloatBuffer viaBatcher = fill(outKind, new float[10]);
            b.forwardHidden(src, 2, viaBatcher);
            assertArrayEquals(want, remaining(viaBatcher), "batcher " + what);
          }
        }
      }
      FloatBuffer readOnlyOut = FloatBuffer.allocate(10).asReadOnlyBuffer();
      assertThrows(
          ReadOnlyBufferException.class, () -> s.forwardHidden(FloatBuffer.wrap(in), 2, readOnlyOut));
      assertThrows(
          ReadOnlyBufferException.class, () -> b.forwardHidden(FloatBuffer.wrap(in), 2, readOnlyOut));
    }
  }

  private static long residentKiB(Path status) throws java.io.IOException {
    for (String line : Files.readAllLines(status)) {
      if (line.startsWith("VmRSS:")) {
        return Long.parseLong(line.replaceAll("[^0-9]", ""));
      }
    }
    throw new IllegalStateException("no VmRSS line in " + status);
  }

  /**
   * The JNI layer copies an array-backed input into native memory; an argument it refuses after
   * that one (here a read-only heap output, through the generated layer, which the idiomatic
   * classes would have staged) must free the copy. 64 refused calls with a 16 MiB input would
   * leave 1 GiB behind otherwise.
   */
  @Test
  void aRefusedArgumentFreesTheCopiesMadeBeforeIt() throws Exception {
    Path status = Path.of("/proc/self/status");
    Assumptions.assumeTrue(Files.isReadable(status), "needs /proc/self/status");
    FloatBuffer input = FloatBuffer.wrap(new float[4 << 20]);
    FloatBuffer refused = FloatBuffer.allocate(8).asReadOnlyBuffer();
    for (int i = 0; i < 4; i++) { // the allocator's and the JIT's first use
      assertThrows(
          IllegalArgumentException.class,
          () -> Capi.moert_session_forward_hidden(null, input, 1, refused));
    }
    long before = residentKiB(status);
    for (int i = 0; i < 64; i++) {
      assertThrows(
          IllegalArgumentException.class,
          () -> Capi.moert_session_forward_hidden(null, input, 1, refused));
    }
    long grown = residentKiB(status) - before;
    assertTrue(grown < 256 * 1024, "resident memory grew by " + grown + " KiB");
  }

  private static Session trainingSession(Model m) {
    try (SessionOptions training = SessionOptions.create()) {
      return Session.create(m, training.mode(CapiConstants.MOERT_MODE_TRAINING));
    }
  }

  @Test
  void tokenInputsTargetsAndParametersFromEveryKindOfBuffer() throws Exception {
    int[] ids = {1, 2, 3, 4, 5, 6, 7, 8};
    List<IntFunction<IntBuffer>> intKinds =
        List.of(
            n -> IntBuffer.allocate(n + 3).position(3).slice(),
            n -> Moert.allocateInts(n),
            n -> ByteBuffer.allocateDirect(n * 4).order(OTHER).asIntBuffer(),
            n -> ByteBuffer.allocate(n * 4).order(ByteOrder.nativeOrder()).asIntBuffer(),
            n -> ByteBuffer.allocateDirect(n * 4 + 2).position(2).slice().order(ByteOrder.nativeOrder()).asIntBuffer());
    try (Model m = Model.load(MODEL);
        Session s = Session.create(m, null);
        Batcher b = Batcher.create(m, null);
        Session t = trainingSession(m)) {
      float[] want = s.forwardTokens(ids, 2);
      for (IntFunction<IntBuffer> kind : intKinds) {
        for (boolean readOnly : new boolean[] {false, true}) {
          IntBuffer src = kind.apply(ids.length);
          src.put(ids).flip();
          if (readOnly) {
            src = src.asReadOnlyBuffer();
          }
          FloatBuffer out = FloatBuffer.allocate(128);
          s.forwardTokens(src, 2, out);
          assertArrayEquals(want, out.array());
          FloatBuffer viaBatcher = Moert.allocateFloats(128);
          b.forwardTokens(src, 2, viaBatcher);
          assertArrayEquals(want, remaining(viaBatcher));

          t.forwardTokens(ids, 2);
          IntBuffer targets = kind.apply(2);
          targets.put(new int[] {5, 9}).flip();
          t.backwardLoss(readOnly ? targets.asReadOnlyBuffer() : targets);
        }
      }
      float[] w = t.getParameter("head.weight");
      for (Kind kind : floatKinds()) {
        FloatBuffer src = fill(kind, w).asReadOnlyBuffer();
        t.setParameter("head.weight", src);
        t.setGradient("head.weight", src);
        FloatBuffer back = fill(kind, new float[w.length]);
        t.getParameter("head.weight", back);
        assertArrayEquals(w, remaining(back), kind.name());
        t.getGradient("head.weight", back);
        assertArrayEquals(w, remaining(back), kind.name());
      }
      byte[] file = Files.readAllBytes(Path.of(HIDDEN));
      ByteBuffer direct = ByteBuffer.allocateDirect(file.length + 1).position(1).slice();
      direct.put(file).flip();
      for (ByteBuffer data :
          List.of(
              ByteBuffer.wrap(file).asReadOnlyBuffer(),
              direct,
              direct.asReadOnlyBuffer(),
              ByteBuffer.allocate(file.length + 7).position(7).slice().put(file).flip())) {
        try (Model fromBuffer = Model.fromBuffer(data, null)) {
          assertEquals("tiny-hidden", fromBuffer.name());
        }
        assertEquals(0, data.position());
      }
    }
  }

  /**
   * An array-backed output is copied out and back as its window only, and back only when the call
   * succeeded: threads filling their own slices of one result array keep each other's results,
   * and a failed call undoes no write another thread made elsewhere in the array.
   */
  @Test
  void windowsOfOneArrayStayEachCallersOwn() throws Exception {
    try (Model m = Model.load(MODEL);
        Session s = Session.create(m, null)) {
      int threads = 4;
      int rows = 8;
      int width = s.io().inputWidth();
      int[][] ids = new int[threads][rows * width];
      float[][] want = new float[threads][];
      for (int t = 0; t < threads; t++) {
        for (int i = 0; i < rows * width; i++) {
          ids[t][i] = (7 * t + 3 * i) % 60;
        }
        want[t] = s.forwardTokens(ids[t], rows);
      }
      int n = want[0].length;
      AtomicReference<Throwable> failure = new AtomicReference<>();
      for (int round = 0; round < 40; round++) {
        float[] shared = new float[threads * n];
        List<Thread> running = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
          final int mine = t;
          Thread th =
              new Thread(
                  () -> {
                    try {
                      FloatBuffer out = FloatBuffer.wrap(shared, mine * n, n);
                      s.forwardTokens(IntBuffer.wrap(ids[mine]), rows, out);
                    } catch (Throwable e) {
                      failure.compareAndSet(null, e);
                    }
                  });
          running.add(th);
          th.start();
        }
        for (Thread th : running) {
          th.join();
        }
        if (failure.get() != null) {
          throw new AssertionError(failure.get());
        }
        for (int t = 0; t < threads; t++) {
          float[] got = new float[n];
          System.arraycopy(shared, t * n, got, 0, n);
          assertArrayEquals(want[t], got, "round " + round + ", slice " + t);
        }
      }

      // A call that fails (token id past the vocabulary) into [0, n) of an array whose element
      // n + 1 this thread keeps writing: no write is ever undone.
      float[] shared = new float[2 * n];
      int[] bad = new int[rows * width];
      bad[0] = 1 << 20;
      Thread failing =
          new Thread(
              () -> {
                for (int i = 0; i < 400; i++) {
                  try {
                    s.forwardTokens(IntBuffer.wrap(bad), rows, FloatBuffer.wrap(shared, 0, n));
                    failure.compareAndSet(null, new AssertionError("a bad token id was accepted"));
                    return;
                  } catch (MoertException expected) {
                    // refused, as it should be
                  }
                }
              });
      failing.start();
      int undone = 0;
      for (int i = 1; failing.isAlive(); i++) {
        shared[n + 1] = i;
        if (shared[n + 1] != i) {
          undone++;
        }
      }
      failing.join();
      if (failure.get() != null) {
        throw new AssertionError(failure.get());
      }
      assertEquals(0, undone, "writes undone by a failed call's copy-back");
      for (int i = 0; i < n; i++) {
        assertEquals(0f, shared[i], "the failed call's own window");
      }
    }
  }
}

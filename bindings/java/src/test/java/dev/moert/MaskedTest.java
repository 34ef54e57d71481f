package dev.moert;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.util.Arrays;
import java.util.List;
import java.util.function.Function;
import org.junit.jupiter.api.Test;

/**
 * Padded batches (issue 15 part 4): a masked pass over rows with garbage in the padding gives
 * zero output rows there and, bit for bit, the outputs and expert counts of a pass over the other
 * rows alone; ignored targets and padding leave the loss's mean.
 */
class MaskedTest {
  private static final String MODEL = System.getProperty("moert.test.model");
  private static final String HIDDEN = System.getProperty("moert.test.hidden.model");

  private static Session session(Model model, int mode) {
    try (SessionOptions options = SessionOptions.create()) {
      return Session.create(model, options.mode(mode).threads(1).seed(7));
    }
  }

  private static int[] batch(int rows, int seed) {
    int[] ids = new int[rows * 4];
    for (int i = 0; i < ids.length; i++) {
      ids[i] = (i * 7 + i / 3 + seed * 13) % 64;
    }
    return ids;
  }

  /** The rows of real (width values each) where mask is true, rows of pad elsewhere. */
  private static float[] padRows(float[] real, int width, boolean[] mask, float pad) {
    float[] out = new float[mask.length * width];
    int next = 0;
    for (int r = 0; r < mask.length; r++) {
      for (int i = 0; i < width; i++) {
        out[r * width + i] = mask[r] ? real[next * width + i] : pad;
      }
      next += mask[r] ? 1 : 0;
    }
    return out;
  }

  private static int[] padRows(int[] real, int width, boolean[] mask, int pad) {
    int[] out = new int[mask.length * width];
    int next = 0;
    for (int r = 0; r < mask.length; r++) {
      for (int i = 0; i < width; i++) {
        out[r * width + i] = mask[r] ? real[next * width + i] : pad;
      }
      next += mask[r] ? 1 : 0;
    }
    return out;
  }

  private static byte[] bytes(boolean[] mask) {
    byte[] b = new byte[mask.length];
    for (int i = 0; i < mask.length; i++) {
      b[i] = (byte) (mask[i] ? 7 : 0); // any nonzero byte takes part
    }
    return b;
  }

  /** The mask bytes at position 2 of buffers of every kind a caller can make. */
  private static List<ByteBuffer> maskBuffers(byte[] mask) {
    Function<ByteBuffer, ByteBuffer> at2 =
        b -> {
          b.position(2);
          b.put(mask);
          return b.position(2).limit(2 + mask.length);
        };
    return List.of(
        at2.apply(ByteBuffer.allocate(mask.length + 4)),
        at2.apply(ByteBuffer.allocateDirect(mask.length + 4)),
        at2.apply(ByteBuffer.allocate(mask.length + 4)).asReadOnlyBuffer(),
        at2.apply(ByteBuffer.allocateDirect(mask.length + 4)).asReadOnlyBuffer(),
        at2.apply(ByteBuffer.allocate(mask.length + 9).position(3).slice()),
        at2.apply(ByteBuffer.allocateDirect(mask.length + 9).position(3).slice()),
        at2.apply(ByteBuffer.allocate(mask.length + 4).order(ByteOrder.LITTLE_ENDIAN)),
        at2.apply(ByteBuffer.allocateDirect(mask.length + 4).order(ByteOrder.BIG_ENDIAN)));
  }

  private static float[] remaining(FloatBuffer b) {
    float[] out = new float[b.remaining()];
    b.duplicate().get(out);
    return out;
  }

  @Test
  void tokensMaskedEqualTheRowsAlone() {
    try (Model m = Model.load(MODEL);
        Session padded = session(m, CapiConstants.MOERT_MODE_INFERENCE);
        Session alone = session(m, CapiConstants.MOERT_MODE_INFERENCE)) {
      boolean[] mask = {true, false, true, true, false};
      int[] real = batch(3, 4);
      int[] tokens = padRows(real, 4, mask, -1); // ids outside the vocabulary [0, 64)
      tokens[tokens.length - 1] = 1 << 30;
      float[] want = padRows(alone.forwardTokens(real, 3), 64, mask, 0f);
      assertArrayEquals(want, padded.forwardTokensMasked(tokens, mask, 5));
      for (int layer : new int[] {2, 4}) {
        long[] counts = padded.expertCounts(layer, CapiConstants.MOERT_COUNTS_LAST);
        assertArrayEquals(alone.expertCounts(layer, CapiConstants.MOERT_COUNTS_LAST), counts);
        assertEquals(3 * 2, Arrays.stream(counts).sum()); // 3 rows, top-2
      }

      for (ByteBuffer rowMask : maskBuffers(bytes(mask))) {
        String what = rowMask.isDirect() + " " + rowMask.isReadOnly() + " " + rowMask.order();
        IntBuffer ids = Moert.allocateInts(tokens.length);
        ids.put(tokens).flip();
        FloatBuffer out = FloatBuffer.allocate(5 * 64 + 1).position(1);
        padded.forwardTokensMasked(ids, rowMask, 5, out);
        assertArrayEquals(want, remaining(out), what);
        assertEquals(2, rowMask.position(), what);
        assertEquals(0f, out.get(0), what); // before the remaining range: untouched
        FloatBuffer direct = Moert.allocateFloats(5 * 64);
        padded.forwardTokensMasked(IntBuffer.wrap(tokens).asReadOnlyBuffer(), rowMask, 5, direct);
        assertArrayEquals(want, remaining(direct), what);
      }

      // All rows taking part is the unmasked pass; all padding gives zeros and counts nothing.
      assertArrayEquals(
          alone.forwardTokens(real, 3),
          padded.forwardTokensMasked(real, new boolean[] {true, true, true}, 3));
      assertArrayEquals(new float[5 * 64], padded.forwardTokensMasked(tokens, new boolean[5], 5));
      assertArrayEquals(new long[8], padded.expertCounts(2, CapiConstants.MOERT_COUNTS_LAST));
    }
  }

  @Test
  void hiddenMaskedEqualTheRowsAloneAndGetNoGradient() {
    try (Model m = Model.load(HIDDEN);
        Session padded = session(m, CapiConstants.MOERT_MODE_TRAINING);
        Session alone = session(m, CapiConstants.MOERT_MODE_TRAINING)) {
      boolean[] mask = {false, true, false, true};
      float[] real = {1f, -0.5f, 0.25f, 2f, 0.125f, -1f, 0.75f, 3f, -2f, 0.5f};
      float[] in = padRows(real, 5, mask, Float.NaN);
      in[4] = Float.POSITIVE_INFINITY;
      float[] outAlone = alone.forwardHidden(real, 2);
      float[] want = padRows(outAlone, 5, mask, 0f);
      for (ByteBuffer rowMask : maskBuffers(bytes(mask))) {
        FloatBuffer out = Moert.allocateFloats(20);
        padded.forwardHiddenMasked(FloatBuffer.wrap(in), rowMask, 4, out);
        assertArrayEquals(want, remaining(out));
      }
      assertArrayEquals(want, padded.forwardHiddenMasked(in, mask, 4));
      assertArrayEquals(
          alone.expertCounts(1, CapiConstants.MOERT_COUNTS_LAST),
          padded.expertCounts(1, CapiConstants.MOERT_COUNTS_LAST));

      float[] gradAlone = {1f, 0.5f, -1f, 2f, 0.25f, -0.5f, 1f, 1f, 0.75f, -2f};
      float[] gin = new float[20];
      float[] ginAlone = new float[10];
      padded.backward(padRows(gradAlone, 5, mask, Float.NaN), gin);
      alone.backward(gradAlone, ginAlone);
      assertArrayEquals(padRows(ginAlone, 5, mask, 0f), gin);
    }
  }

  @Test
  void aMaskOfTheWrongLengthIsTheLibrarysError() {
    try (Model m = Model.load(HIDDEN);
        Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE);
        Model tm = Model.load(MODEL);
        Session ts = session(tm, CapiConstants.MOERT_MODE_INFERENCE)) {
      float[] in = new float[15];
      FloatBuffer out = FloatBuffer.wrap(new float[15]);
      out.put(0, 7f);
      ByteBuffer two = ByteBuffer.wrap(new byte[2]);
      MoertException e =
          assertThrows(
              MoertException.class, () -> s.forwardHiddenMasked(FloatBuffer.wrap(in), two, 3, out));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
      for (String part : new String[] {"row mask", "2", "3"}) {
        assertTrue(e.getMessage().contains(part), e.getMessage());
      }
      assertEquals(7f, out.get(0)); // a failed call leaves the output alone
      e =
          assertThrows(
              MoertException.class, () -> ts.forwardTokensMasked(batch(2, 1), new boolean[3], 2));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
      assertTrue(e.getMessage().contains("row mask"), e.getMessage());
    }
  }

  private static double crossEntropy(float[] logits, int row, int target) {
    double max = Double.NEGATIVE_INFINITY;
    for (int v = 0; v < 64; v++) {
      max = Math.max(max, logits[row * 64 + v]);
    }
    double sum = 0;
    for (int v = 0; v < 64; v++) {
      sum += Math.exp(logits[row * 64 + v] - max);
    }
    return max + Math.log(sum) - logits[row * 64 + target];
  }

  @Test
  void backwardLossLeavesOutPaddingAndIgnoredTargets() {
    int ignore = CapiConstants.MOERT_IGNORE_TARGET;
    try (Model m = Model.load(MODEL);
        Session padded = session(m, CapiConstants.MOERT_MODE_TRAINING);
        Session alone = session(m, CapiConstants.MOERT_MODE_TRAINING);
        Session auxOnly = session(m, CapiConstants.MOERT_MODE_TRAINING)) {
      boolean[] mask = {true, false, true, true, false};
      int[] real = batch(3, 9);
      padded.forwardTokensMasked(padRows(real, 4, mask, 64), mask, 5);
      // Rows 1 and 4 are padding with garbage targets; row 2 takes part with no target.
      double loss = padded.backwardLoss(new int[] {5, 12345, ignore, 17, -3});
      float[] logits = alone.forwardTokens(real, 3);
      assertEquals(alone.backwardLoss(new int[] {5, ignore, 17}), loss);
      // With every target ignored, only the auxiliary losses remain.
      auxOnly.forwardTokens(real, 3);
      double aux = auxOnly.backwardLoss(new int[] {ignore, ignore, ignore});
      double want = (crossEntropy(logits, 0, 5) + crossEntropy(logits, 2, 17)) / 2 + aux;
      assertEquals(want, loss, 1e-5);
      assertArrayEquals(alone.getGradient("head.weight"), padded.getGradient("head.weight"));
    }
  }
}

package dev.moert;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.ReadOnlyBufferException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.function.Executable;
import org.junit.jupiter.api.io.TempDir;

/** The Java binding against the example model: 4 token ids in, 64 logits out, MoE at 2 and 4. */
class MoertTest {
  private static final String MODEL = System.getProperty("moert.test.model");

  @TempDir Path dir;

  private static int[] batch(int rows, int seed) {
    int[] ids = new int[rows * 4];
    for (int i = 0; i < ids.length; i++) {
      ids[i] = (i * 7 + i / 3 + seed * 13) % 64;
    }
    return ids;
  }

  private static MoertException expectCode(int code, Executable call) {
    MoertException e = assertThrows(MoertException.class, call);
    assertEquals(code, e.getCode(), e.getMessage());
    assertTrue(e.getMessage().length() > Moert.codeName(code).length() + 2, "no message");
    return e;
  }

  private static Session session(Model model, int mode) {
    try (SessionOptions options = SessionOptions.create()) {
      return Session.create(model, options.mode(mode).threads(2).seed(7));
    }
  }

  /** One optimizer step over two micro-batches; the mean loss. */
  private static double trainStep(Session s, int step) {
    s.zeroGrad();
    double sum = 0;
    for (int mb = 0; mb < 2; mb++) {
      int[] ids = batch(16, step * 2 + mb);
      s.forwardTokens(ids, 16);
      int[] targets = new int[16];
      for (int r = 0; r < 16; r++) {
        targets[r] = ids[r * 4 + 3];
      }
      sum += s.backwardLoss(targets);
    }
    Session.Step result = s.step();
    assertTrue(result.learningRate() > 0 && result.gradientNorm() > 0, result.toString());
    return sum / 2;
  }

  /**
   * A step made and counted before it fails (weight decay takes moe0.w1 past the fp32 range)
   * throws StepMadeException with its figures; one refused before any change, a plain
   * MoertException.
   */
  @Test
  void aStepMadeBeforeItFailedThrowsItsFigures() {
    try (Model m = Model.load(MODEL);
        SessionOptions o = SessionOptions.create().mode(CapiConstants.MOERT_MODE_TRAINING);
        Session s = Session.create(m, o)) {
      s.setEval(true);
      MoertException refused = assertThrows(MoertException.class, s::step);
      assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, refused.getCode());
      assertFalse(refused instanceof StepMadeException);
      s.setEval(false);
      s.setConfig("lr", "1");
      s.setConfig("weight_decay", "3");
      s.forwardTokens(batch(16, 0), 16);
      s.backwardLoss(new int[16]);
      float[] huge = new float[s.getParameter("moe0.w1").length];
      Arrays.fill(huge, 3e38f);
      s.setParameter("moe0.w1", huge);
      StepMadeException made = assertThrows(StepMadeException.class, s::step);
      assertEquals(CapiConstants.MOERT_ERR_NUMERIC, made.getCode());
      assertEquals(1.0, made.getStep().learningRate());
      assertTrue(made.getStep().gradientNorm() > 0, made.getStep().toString());
      assertEquals(1, s.stepCount());
    }
  }

  @Test
  void versionsMatchTheHeader() {
    assertEquals(CapiConstants.MOERT_ABI_VERSION, Moert.abiVersion());
    assertEquals(
        CapiConstants.MOERT_VERSION_MAJOR
            + "."
            + CapiConstants.MOERT_VERSION_MINOR
            + "."
            + CapiConstants.MOERT_VERSION_PATCH,
        Moert.version());
    assertEquals(1, Moert.schemaVersion()[0]);
    assertEquals("MOERT_ERR_IO", Moert.codeName(CapiConstants.MOERT_ERR_IO));
    assertEquals(0xFFFFFFFFL, CapiConstants.MOERT_ALL_LAYERS);
  }

  @Test
  void quantizesExpertsToFp8AndHoldsThemAtOneBytePerValue() {
    try (Model m = Model.load(MODEL)) {
      // Every parameter and the two loss-free biases, in fp32.
      assertEquals(4L * (110720 + 16), m.residentBytes());
      try (Model q = m.quantizeFp8(false)) {
        assertEquals(8, q.numTensors(2));
        // moe0.w1 [8, 32, 64]: a code per value and, per expert, one block scale padded to 4.
        assertEquals(
            new Model.Tensor(
                "w1",
                CapiConstants.MOERT_DTYPE_F8E4M3,
                CapiConstants.MOERT_DTYPE_F8E4M3,
                16384,
                16384 + 8 * 4 * 4),
            q.tensor(2, 1));
        assertEquals(CapiConstants.MOERT_DTYPE_F32, q.tensor(2, 0).heldDtype());
        long after = q.residentBytes();
        assertTrue(after < 4L * (110720 + 16) / 3, Long.toString(after));
        Path path = dir.resolve("fp8.moert");
        q.save(path);
        try (Model r = Model.load(path)) {
          assertEquals(after, r.residentBytes());
        }
        expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> q.tensor(2, 8));
      }
      try (Model p2 = m.quantizeFp8(true)) {
        assertEquals(8, p2.numTensors(2));
      }
    }
  }

  @Test
  void inspectsTheModel() {
    try (Model m = Model.load(MODEL)) {
      assertEquals("tiny-moe", m.name());
      Model.Layer[] layers = m.layers();
      assertEquals(6, layers.length);
      assertEquals(new Model.Layer(2, CapiConstants.MOERT_LAYER_MOE, "moe0", 64, 64), layers[2]);
      assertEquals(CapiConstants.MOERT_LAYER_EMBEDDING, layers[0].kind());
      assertEquals(new Model.Io(CapiConstants.MOERT_INPUT_TOKENS, 4, 64), m.io());
      assertEquals(64, m.vocabSize());
      assertEquals(new Model.ParameterCounts(110720, 36032), m.numParameters());
      assertEquals(8, m.moeInt(2, CapiConstants.MOERT_MOE_NUM_EXPERTS));
      assertEquals(2, m.moeInt(2, CapiConstants.MOERT_MOE_TOP_K));
      assertEquals(
          CapiConstants.MOERT_SCORE_SOFTMAX, m.moeInt(4, CapiConstants.MOERT_MOE_SCORE_FUNCTION));
      assertEquals(2.5, m.moeFloat(2, CapiConstants.MOERT_MOE_ROUTED_SCALING_FACTOR));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          () -> m.moeInt(1, CapiConstants.MOERT_MOE_NUM_EXPERTS));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> m.layer(99));
    }
  }

  @Test
  void profileOfASessionAloneIsZero() {
    Session.Profile zero =
        new Session.Profile(Duration.ZERO, Duration.ZERO, Duration.ZERO, Duration.ZERO);
    Session closed;
    try (Model m = Model.load(MODEL);
        Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE)) {
      closed = s;
      assertEquals(4, CapiConstants.MOERT_PROFILE_COUNT);
      for (int i = 0; i < 2; i++) {
        assertEquals(zero, s.profile());
        s.forwardTokens(batch(3, i), 3);
      }
    }
    MoertException e = assertThrows(MoertException.class, closed::profile);
    assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, e.getCode());
  }

  @Test
  void forwardWithArraysAndDirectBuffersAgrees() {
    try (Model m = Model.load(MODEL);
        Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE)) {
      int rows = 32;
      int[] ids = batch(rows, 0);
      float[] fromArrays = s.forwardTokens(ids, rows);
      assertEquals(rows * 64, fromArrays.length);

      IntBuffer in = Moert.allocateInts(ids.length);
      in.put(ids).flip();
      FloatBuffer out = Moert.allocateFloats(rows * 64);
      s.forwardTokens(in, rows, out);
      assertEquals(0, in.position(), "the input position moved");
      float[] fromBuffers = new float[rows * 64];
      out.get(fromBuffers);
      assertArrayEquals(fromArrays, fromBuffers);

      // A buffer covers position..limit: a window into a larger direct buffer.
      FloatBuffer big = Moert.allocateFloats(rows * 64 + 10);
      big.position(10);
      s.forwardTokens(in, rows, big);
      float[] window = new float[rows * 64];
      big.get(window);
      assertArrayEquals(fromArrays, window);

      // Array-backed buffers work too (copied).
      FloatBuffer heap = FloatBuffer.allocate(rows * 64);
      s.forwardTokens(IntBuffer.wrap(ids), rows, heap);
      assertArrayEquals(fromArrays, heap.array());

      for (int layer : new int[] {2, 4}) {
        long[] counts = s.expertCounts(layer, CapiConstants.MOERT_COUNTS_LAST);
        assertEquals(8, counts.length);
        assertEquals(rows * 2, Arrays.stream(counts).sum());
        assertTrue(s.maxVio(layer, CapiConstants.MOERT_COUNTS_LAST) >= 0);
      }
      assertTrue(s.maxVio(CapiConstants.MOERT_ALL_LAYERS, CapiConstants.MOERT_COUNTS_LAST) >= 0);
      assertEquals(
          4 * rows * 2, Arrays.stream(s.expertCounts(2, CapiConstants.MOERT_COUNTS_EVAL)).sum());
      s.resetMetrics();
      assertEquals(0, Arrays.stream(s.expertCounts(2, CapiConstants.MOERT_COUNTS_EVAL)).sum());
    }
  }

  @Test
  void badInputsAreExceptionsNotCrashes() {
    try (Model m = Model.load(MODEL);
        Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE)) {
      int[] ids = batch(8, 1);
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          () -> s.forwardTokens(IntBuffer.wrap(ids), 8, FloatBuffer.allocate(3)));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          () -> s.forwardTokens(Arrays.copyOf(ids, 5), 8));
      int[] bad = ids.clone();
      bad[0] = 1000;
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.forwardTokens(bad, 8));
      assertThrows(MoertException.class, () -> s.forwardHidden(new float[4], 1));
      MoertException notMoE =
          expectCode(
              CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
              () -> s.expertCounts(1, CapiConstants.MOERT_COUNTS_LAST));
      assertTrue(notMoE.getMessage().contains("MoE layers: [2, 4]"), notMoE.getMessage());
      // A buffer in the other byte order is converted (BuffersTest covers every kind); a
      // read-only buffer cannot be an output.
      FloatBuffer bigEndian = ByteBuffer.allocateDirect(8 * 64 * 4).order(ByteOrder.BIG_ENDIAN)
          .asFloatBuffer();
      s.forwardTokens(IntBuffer.wrap(ids), 8, bigEndian);
      assertEquals(s.forwardTokens(ids, 8)[5], bigEndian.get(5));
      assertThrows(ReadOnlyBufferException.class, () -> s.forwardTokens(
          IntBuffer.wrap(ids), 8, FloatBuffer.allocate(8 * 64).asReadOnlyBuffer()));
      expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, s::zeroGrad);
      // A row count that does not fit the input is refused before an output of its size is
      // allocated (30M rows of 64 outputs once ran the heap out; 2^30 overflowed int).
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.forwardTokens(ids, 30_000_000));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.forwardTokens(ids, 1 << 30));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          () -> s.forwardTokensMasked(ids, new boolean[8], 30_000_000));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.forwardTokens(ids, -1));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.forwardTokens(null, 1));
      // Arguments the library would refuse are MoertExceptions too, whatever the binding sees.
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.save("a\0b"));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Model.fromBytes(null, null));
      // Every null argument reaches the library, which refuses it (on every rank of a job, where
      // a NullPointerException on one would leave the others waiting in the collective).
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Session.create(null, null));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Batcher.create(null, null));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.forwardTokensMasked(ids, null, 8));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          () -> s.forwardTokens((IntBuffer) null, 8, FloatBuffer.allocate(8 * 64)));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          () -> s.forwardTokens(IntBuffer.wrap(ids), 8, (FloatBuffer) null));
      expectCode(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.setParameter("head.weight", (float[]) null));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.setExpertBias(2, null));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Model.load((java.nio.file.Path) null));
      try (LoadOptions lo = LoadOptions.create();
          BatcherOptions bo = BatcherOptions.create()) {
        expectCode(
            CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> lo.loadModel((ByteBuffer) null, null));
        expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> lo.loadCheckpoint(null, "x"));
        expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> bo.maxWait(null));
        expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> bo.sessionOptions(null));
      }
    }
    try (SessionOptions o = SessionOptions.create()) {
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> o.threads(0));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> o.config("no_such_knob", "1"));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> o.mode(42));
      o.config("check_finite", "false").device(CapiConstants.MOERT_DEVICE_CUDA, 0);
      try (Model m = Model.load(MODEL)) {
        try (Session cuda = Session.create(m, o)) {
          assertFalse(cuda.isClosed()); // a build with a CUDA backend and a GPU
        } catch (MoertException e) {
          assertEquals(CapiConstants.MOERT_ERR_UNSUPPORTED, e.getCode(), e.getMessage());
        }
      }
    }
  }

  @Test
  void closeTwiceAndUseAfterClose() {
    Model m = Model.load(MODEL);
    Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE);
    m.close();
    m.close();
    assertTrue(m.isClosed());
    expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, m::name);
    assertEquals(2 * 64, s.forwardTokens(batch(2, 1), 2).length); // the session outlives it
    s.close();
    s.close();
    expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, () -> s.forwardTokens(batch(2, 1), 2));
    expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, () -> Session.create(m, null));
  }

  @Test
  void trainingStepBackwardAndParameters() {
    try (Model m = Model.load(MODEL);
        Session s = session(m, CapiConstants.MOERT_MODE_TRAINING)) {
      s.setConfig("lr", "0.01");
      Session.Parameter[] params = s.parameters();
      assertTrue(Arrays.asList(params).contains(new Session.Parameter("moe0.w1", 8 * 32 * 64)));
      float[] before = s.getParameter("moe0.w1");

      double first = trainStep(s, 0);
      assertTrue(first > 3 && first < 6, "first loss " + first);
      float[] grad = s.getGradient("moe0.w1");
      assertTrue(sumSquares(grad) > 0, "zero gradient");
      assertFalse(Arrays.equals(before, s.getParameter("moe0.w1")), "the step changed nothing");
      assertEquals(1, s.stepCount());
      float[] bias = s.expertBias(2);
      assertEquals(8, bias.length);
      assertNotEquals(0.0, sumSquares(bias), "the loss-free bias did not move");
      for (int i = 0; i < 5; i++) {
        trainStep(s, i + 1);
      }
      assertTrue(trainStep(s, 0) < first, "the loss did not fall");

      FloatBuffer direct = Moert.allocateFloats(before.length);
      direct.put(before).flip();
      s.setParameter("moe0.w1", direct);
      assertArrayEquals(before, s.getParameter("moe0.w1"));
      float[] nan = before.clone();
      nan[3] = Float.NaN;
      expectCode(CapiConstants.MOERT_ERR_NUMERIC, () -> s.setParameter("moe0.w1", nan));
      s.setGradient("moe0.w1", new float[grad.length]);
      assertEquals(0.0, sumSquares(s.getGradient("moe0.w1")));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.getParameter("nope"));

      s.setExpertBias(2, new float[8]);
      s.setBiasFrozen(CapiConstants.MOERT_ALL_LAYERS, true);
      trainStep(s, 3);
      assertEquals(0.0, sumSquares(s.expertBias(2)), "a frozen bias moved");
      s.setBiasFrozen(CapiConstants.MOERT_ALL_LAYERS, false);
      s.setBiasUpdateRate(2, 0.0);
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> s.setBiasUpdateRate(2, -1));

      s.setEval(true);
      s.forwardTokens(batch(4, 2), 4);
      expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, () -> s.backwardLoss(new int[4]));
      s.setEval(false);

      s.forwardTokens(batch(4, 5), 4);
      float[] gradOut = new float[4 * 64];
      Arrays.fill(gradOut, 0.01f);
      assertTrue(s.backward(gradOut, null) >= 0);
    }
  }

  private static double sumSquares(float[] v) {
    double sum = 0;
    for (float x : v) {
      sum += (double) x * x;
    }
    return sum;
  }

  @Test
  void checkpointResumesBitIdentically() {
    String ckpt = dir.resolve("step-2.moert").toString();
    try (Model m = Model.load(MODEL);
        Session a = session(m, CapiConstants.MOERT_MODE_TRAINING);
        Session b = session(m, CapiConstants.MOERT_MODE_TRAINING)) {
      trainStep(a, 0);
      trainStep(a, 1);
      a.save(ckpt);
      trainStep(a, 2);
      b.load(ckpt);
      assertEquals(2, b.stepCount());
      trainStep(b, 2);
      assertArrayEquals(a.getParameter("moe1.w2"), b.getParameter("moe1.w2"));
      try (Model asModel = Model.load(ckpt)) {
        assertEquals("tiny-moe", asModel.name());
      }
      expectCode(
          CapiConstants.MOERT_ERR_IO,
          () -> a.save(dir.resolve("missing").resolve("x.moert").toString()));
    }
  }

  @Test
  void corruptFilesAreExceptionsWithTheMessage() throws IOException {
    byte[] data = Files.readAllBytes(Path.of(MODEL));
    Path truncated = dir.resolve("truncated.moert");
    Files.write(truncated, Arrays.copyOf(data, data.length / 2));
    MoertException e = expectCode(CapiConstants.MOERT_ERR_INVALID_MODEL, () -> Model.load(truncated));
    assertTrue(e.getMessage().contains("truncated.moert"), e.getMessage());
    expectCode(
        CapiConstants.MOERT_ERR_INVALID_MODEL, () -> Model.fromBytes(Arrays.copyOf(data, 100), null));
    expectCode(CapiConstants.MOERT_ERR_IO, () -> Model.load(dir.resolve("absent.moert")));

    ByteBuffer direct = ByteBuffer.allocateDirect(data.length);
    direct.put(data).flip();
    try (Model m = Model.fromBuffer(direct, null);
        Session s = session(m, CapiConstants.MOERT_MODE_TRAINING)) {
      trainStep(s, 0);
      Path ckpt = dir.resolve("ckpt.moert");
      s.save(ckpt.toString());
      byte[] raw = Files.readAllBytes(ckpt);
      Files.write(ckpt, Arrays.copyOf(raw, raw.length - 64));
      trainStep(s, 1);
      float[] before = s.getParameter("moe1.w2");
      assertThrows(MoertException.class, () -> s.load(ckpt.toString()));
      assertEquals(2, s.stepCount());
      assertArrayEquals(before, s.getParameter("moe1.w2"));
    }
  }

  @Test
  void oneSessionServesManyThreads() throws Exception {
    try (Model m = Model.load(MODEL);
        Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE)) {
      int workers = 16;
      float[][] want = new float[workers][];
      for (int w = 0; w < workers; w++) {
        want[w] = s.forwardTokens(batch(8, w), 8);
      }
      ExecutorService pool = Executors.newFixedThreadPool(8);
      try {
        List<Future<float[]>> results = new ArrayList<>();
        for (int r = 0; r < 64; r++) {
          int w = r % workers;
          results.add(
              pool.submit(
                  () -> {
                    IntBuffer in = Moert.allocateInts(8 * 4);
                    in.put(batch(8, w)).flip();
                    FloatBuffer out = Moert.allocateFloats(8 * 64);
                    s.forwardTokens(in, 8, out);
                    float[] got = new float[8 * 64];
                    out.get(got);
                    return got;
                  }));
        }
        for (int r = 0; r < results.size(); r++) {
          assertArrayEquals(want[r % workers], results.get(r).get(), "request " + r);
        }
      } finally {
        pool.shutdown();
      }
    }
  }

  @Test
  void closeWaitsForCallsInFlight() throws Exception {
    Model m = Model.load(MODEL);
    Session s = session(m, CapiConstants.MOERT_MODE_INFERENCE);
    m.close();
    ExecutorService pool = Executors.newFixedThreadPool(4);
    List<Future<Integer>> results = new ArrayList<>();
    for (int t = 0; t < 4; t++) {
      results.add(
          pool.submit(
              () -> {
                int done = 0;
                for (int i = 0; i < 50; i++) {
                  try {
                    s.forwardTokens(batch(16, i), 16);
                    done++;
                  } catch (MoertException e) {
                    assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, e.getCode());
                  }
                }
                return done;
              }));
    }
    s.close();
    for (Future<Integer> f : results) {
      assertTrue(f.get() >= 0);
    }
    pool.shutdown();
  }
}

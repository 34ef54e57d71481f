package dev.moert;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReferenceArray;
import org.junit.jupiter.api.Test;

/**
 * The batcher from many threads: answers agree with solo calls (bit for bit where a pass carried
 * one request, within {@link #TOLERANCE} where requests shared it), errors stay with their caller.
 */
class BatcherTest {
  private static final String MODEL = System.getProperty("moert.test.model");
  private static final String HIDDEN = System.getProperty("moert.test.hidden.model");

  /** The longest any future may take here: nothing may hang. */
  private static final long TIMEOUT_S = 60;

  private static int[] batch(int rows, int seed) {
    int[] ids = new int[rows * 4];
    for (int i = 0; i < ids.length; i++) {
      ids[i] = (i * 7 + i / 3 + seed * 13) % 64;
    }
    return ids;
  }

  private static Batcher batcher(Model m) {
    try (SessionOptions so = SessionOptions.create();
        BatcherOptions options = BatcherOptions.create()) {
      so.threads(1);
      options.sessions(2).maxBatchRows(64).maxWait(Duration.ofMillis(5)).sessionOptions(so);
      return Batcher.create(m, options);
    }
  }

  /**
   * Per row, ||batched - solo|| / ||solo|| (L2) for an answer that shared a pass: the CPU GEMMs
   * (oneDNN) round a row differently in calls of different row counts (worst row 5.4e-7 in the
   * C ABI's tests, tests/capi/batcher_test.cc, which say why and where a routing tie could exceed
   * it).
   */
  private static final double TOLERANCE = 1e-5;

  private static void assertAgrees(
      float[] want, float[] got, int width, boolean alone, String what) {
    if (alone) {
      assertArrayEquals(want, got, what + " (its pass carried it alone)");
      return;
    }
    assertEquals(want.length, got.length, what);
    for (int r = 0; r * width < want.length; r++) {
      double num = 0;
      double den = 0;
      for (int j = r * width; j < (r + 1) * width; j++) {
        double d = (double) got[j] - want[j];
        num += d * d;
        den += (double) want[j] * want[j];
      }
      double e = Math.sqrt(num / Math.max(den, 1e-300));
      assertTrue(e <= TOLERANCE, what + ": row " + r + " is " + e + " from the solo call's");
    }
  }

  @Test
  void answersAgreeWithSoloCallsFromManyThreads() throws Exception {
    try (Model m = Model.load(MODEL);
        Session ref = Session.create(m, null);
        Batcher b = batcher(m)) {
      int requests = 64;
      float[][] want = new float[requests][];
      for (int r = 0; r < requests; r++) {
        want[r] = ref.forwardTokens(batch(1 + r % 5, r), 1 + r % 5);
      }
      ExecutorService pool = Executors.newFixedThreadPool(16);
      try {
        List<Future<Batcher.RequestStats>> futures = new ArrayList<>();
        for (int r = 0; r < requests; r++) {
          final int req = r;
          futures.add(
              pool.submit(
                  () -> {
                    int rows = 1 + req % 5;
                    float[] out = new float[rows * 64];
                    Batcher.RequestStats st =
                        b.forwardTokens(
                            java.nio.IntBuffer.wrap(batch(rows, req)),
                            rows,
                            java.nio.FloatBuffer.wrap(out));
                    assertAgrees(want[req], out, 64, st.batchRequests() == 1, "request " + req);
                    return st;
                  }));
        }
        int shared = 0;
        for (Future<Batcher.RequestStats> f : futures) {
          Batcher.RequestStats st = f.get();
          assertTrue(st.batchRows() >= 1 && st.session() >= 0 && st.session() < 2, st.toString());
          shared += st.batchRequests() > 1 ? 1 : 0;
        }
        assertTrue(shared > 0, "no request shared a pass");
      } finally {
        pool.shutdown();
      }
      Batcher.Counters c = b.counters();
      assertEquals(requests, c.requests());
      assertEquals(0, c.failed());
      assertTrue(c.batches() < requests && c.meanBatchRows() > 1, c.toString());
    }
  }

  @Test
  void errorsBelongToTheirCallerAndMisuseIsRefused() {
    try (Model m = Model.load(MODEL);
        BatcherOptions options = BatcherOptions.create()) {
      Batcher b = Batcher.create(m, options.maxBatchRows(8));
      int[] bad = batch(2, 1);
      bad[6] = 99;
      MoertException e = assertThrows(MoertException.class, () -> b.forwardTokens(bad, 2));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
      assertTrue(e.getMessage().contains("row 1, column 2"), e.getMessage());
      assertThrows(MoertException.class, () -> b.forwardTokens(batch(9, 0), 9));
      // Refused by the library (and counted), with no output of 30M rows allocated (it ran the
      // heap out).
      MoertException huge =
          assertThrows(MoertException.class, () -> b.forwardTokens(batch(1, 0), 30_000_000));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, huge.getCode());
      assertThrows(MoertException.class, () -> b.forwardHidden(new float[4], 1));
      assertEquals(64, b.forwardTokens(batch(1, 0), 1).length);
      assertEquals(5, b.counters().requests());
      assertEquals(4, b.counters().failed());
      b.close();
      b.close();
      MoertException closed =
          assertThrows(MoertException.class, () -> b.forwardTokens(batch(1, 0), 1));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, closed.getCode());
    }
    try (BatcherOptions o = BatcherOptions.create()) {
      assertThrows(MoertException.class, () -> o.sessions(0));
      assertThrows(MoertException.class, () -> o.maxBatchRows(0));
      assertThrows(MoertException.class, () -> o.maxWait(Duration.ofSeconds(2)));
      assertThrows(MoertException.class, () -> o.maxWait(Duration.ofMillis(-1)));
      assertThrows(MoertException.class, () -> o.maxQueuedRows(-1));
      assertThrows(MoertException.class, () -> o.maxQueuedRows((1L << 40) + 1));
      try (Model m = Model.load(MODEL)) {
        // A queue bound below the row cap (256) could never take a full request.
        o.maxQueuedRows(8);
        MoertException e = assertThrows(MoertException.class, () -> Batcher.create(m, o));
        assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
        o.maxQueuedRows(0);
      }
      try (Model m = Model.load(MODEL);
          SessionOptions training = SessionOptions.create().mode(CapiConstants.MOERT_MODE_TRAINING)) {
        o.sessionOptions(training);
        MoertException e = assertThrows(MoertException.class, () -> Batcher.create(m, o));
        assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
      }
    }
  }

  private static Batcher.Result await(CompletableFuture<Batcher.Result> f) throws Exception {
    return f.get(TIMEOUT_S, TimeUnit.SECONDS);
  }

  /** The MoertException a future completed with. */
  private static MoertException failure(CompletableFuture<Batcher.Result> f) throws Exception {
    ExecutionException e =
        assertThrows(ExecutionException.class, () -> f.get(TIMEOUT_S, TimeUnit.SECONDS));
    assertTrue(e.getCause() instanceof MoertException, String.valueOf(e.getCause()));
    return (MoertException) e.getCause();
  }

  @Test
  void submittedAnswersEqualBlockingOnes() throws Exception {
    try (Model m = Model.load(MODEL);
        Batcher b = batcher(m)) {
      for (int r = 0; r < 8; r++) {
        int rows = 1 + r % 5;
        float[] want = b.forwardTokens(batch(rows, r), rows);
        // One request at a time: each pass carries it alone, so bit for bit.
        Batcher.Result got = await(b.submitTokens(batch(rows, r), rows));
        assertEquals(1, got.stats().batchRequests());
        assertEquals(rows, got.stats().batchRows());
        assertTrue(got.stats().session() >= 0 && got.stats().session() < 2);
        assertAgrees(want, got.outputs(), 64, true, "tokens request " + r);
        // A direct buffer, from its position, which stays where it was.
        IntBuffer direct =
            ByteBuffer.allocateDirect((rows * 4 + 3) * 4)
                .order(ByteOrder.nativeOrder())
                .asIntBuffer();
        direct.position(3);
        direct.duplicate().put(batch(rows, r));
        assertArrayEquals(want, await(b.submitTokens(direct, rows)).outputs());
        assertEquals(3, direct.position());
      }
    }
    try (Model m = Model.load(HIDDEN);
        Batcher b = batcher(m)) {
      Model.Io io = b.io();
      for (int r = 0; r < 4; r++) {
        int rows = 1 + r;
        float[] in = new float[rows * io.inputWidth()];
        for (int i = 0; i < in.length; i++) {
          in[i] = (float) Math.sin(i * 0.37 + r);
        }
        float[] want = b.forwardHidden(in, rows);
        Batcher.Result got = await(b.submitHidden(in, rows));
        assertEquals(rows * io.outputWidth(), got.outputs().length);
        assertAgrees(want, got.outputs(), io.outputWidth(), true, "hidden request " + r);
        FloatBuffer readOnly = FloatBuffer.wrap(in).asReadOnlyBuffer();
        assertArrayEquals(want, await(b.submitHidden(readOnly, rows)).outputs());
      }
    }
  }

  @Test
  void manyConcurrentSubmissionsAllCompleteCorrectly() throws Exception {
    try (Model m = Model.load(MODEL);
        Session ref = Session.create(m, null);
        Batcher b = batcher(m)) {
      int requests = 200;
      float[][] want = new float[requests][];
      for (int r = 0; r < requests; r++) {
        want[r] = ref.forwardTokens(batch(1 + r % 5, r), 1 + r % 5);
      }
      AtomicReferenceArray<CompletableFuture<Batcher.Result>> futures =
          new AtomicReferenceArray<>(requests);
      Thread[] submitters = new Thread[4];
      for (int t = 0; t < submitters.length; t++) {
        final int first = t;
        submitters[t] =
            new Thread(
                () -> {
                  for (int r = first; r < requests; r += submitters.length) {
                    futures.set(r, b.submitTokens(batch(1 + r % 5, r), 1 + r % 5));
                  }
                });
        submitters[t].start();
      }
      for (Thread t : submitters) {
        t.join(TimeUnit.SECONDS.toMillis(TIMEOUT_S));
        assertTrue(!t.isAlive(), "a submitting thread hangs");
      }
      int shared = 0;
      for (int r = 0; r < requests; r++) {
        assertNotNull(futures.get(r), "request " + r + " was not submitted");
        Batcher.Result got = await(futures.get(r));
        assertAgrees(
            want[r], got.outputs(), 64, got.stats().batchRequests() == 1, "request " + r);
        shared += got.stats().batchRequests() > 1 ? 1 : 0;
      }
      assertTrue(shared > 0, "no request shared a pass");
      Batcher.Counters c = b.counters();
      assertEquals(requests, c.requests());
      assertEquals(0, c.failed());
    }
  }

  /** Records the JNI layer's calls, as Batcher's own pending request would receive them. */
  static final class Recorder {
    final AtomicInteger calls = new AtomicInteger();

    void complete(int code, byte[] message, float[] out, long[] stats) {
      calls.incrementAndGet();
    }
  }

  @Test
  void badRequestsThrowAtSubmitAndAreNeverAnswered() throws Exception {
    try (Model m = Model.load(MODEL);
        BatcherOptions options = BatcherOptions.create()) {
      Batcher b = Batcher.create(m, options.maxBatchRows(8));
      int[] bad = batch(2, 1);
      bad[6] = 99;
      MoertException e = assertThrows(MoertException.class, () -> b.submitTokens(bad, 2));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
      assertTrue(e.getMessage().contains("row 1, column 2"), e.getMessage());
      assertEquals(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          assertThrows(MoertException.class, () -> b.submitTokens(batch(9, 0), 9)).getCode());
      assertEquals(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
          assertThrows(MoertException.class, () -> b.submitTokens(batch(1, 0), 2)).getCode());
      assertThrows(MoertException.class, () -> b.submitTokens(batch(1, 0), -1));
      assertThrows(MoertException.class, () -> b.submitHidden(new float[4], 1));
      // Through the generated layer: a refused request's callback never runs, and a good one's
      // exactly once, by the time close() returns.
      Recorder refused = new Recorder();
      Recorder accepted = new Recorder();
      try (NativeHandle<SWIGTYPE_p_moert_batcher>.Use u = b.use()) {
        SWIGTYPE_p_moert_status status =
            Capi.moert_batcher_submit_tokens(u.ptr(), IntBuffer.wrap(bad), 2, refused);
        assertNotNull(status);
        assertThrows(MoertException.class, () -> MoertException.check(status));
        MoertException.check(
            Capi.moert_batcher_submit_tokens(u.ptr(), IntBuffer.wrap(batch(1, 0)), 1, accepted));
      }
      assertEquals(64, await(b.submitTokens(batch(1, 0), 1)).outputs().length);
      b.close();
      assertEquals(0, refused.calls.get());
      assertEquals(1, accepted.calls.get());
      MoertException closed =
          assertThrows(MoertException.class, () -> b.submitTokens(batch(1, 0), 1));
      assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, closed.getCode());
    }
  }

  @Test
  void closeAnswersEveryRequestInFlight() throws Exception {
    try (Model m = Model.load(MODEL);
        Session ref = Session.create(m, null);
        SessionOptions so = SessionOptions.create();
        BatcherOptions options = BatcherOptions.create()) {
      so.threads(1);
      // A long bounded wait and a cap no request fills: requests wait in the queue.
      options.sessions(1).maxBatchRows(1024).maxWait(Duration.ofMillis(500)).sessionOptions(so);
      for (int round = 0; round < 3; round++) {
        Batcher b = Batcher.create(m, options);
        int requests = 40;
        List<CompletableFuture<Batcher.Result>> futures = new ArrayList<>();
        for (int r = 0; r < requests; r++) {
          futures.add(b.submitTokens(batch(1 + r % 3, r), 1 + r % 3));
        }
        long start = System.nanoTime();
        b.close();
        assertTrue(
            System.nanoTime() - start < TimeUnit.SECONDS.toNanos(TIMEOUT_S), "close() hung");
        int refused = 0;
        for (int r = 0; r < requests; r++) {
          CompletableFuture<Batcher.Result> f = futures.get(r);
          assertTrue(f.isDone(), "request " + r + " was not answered by close()");
          if (f.isCompletedExceptionally()) {
            MoertException e = failure(f);
            assertEquals(CapiConstants.MOERT_ERR_INVALID_STATE, e.getCode(), e.getMessage());
            refused++;
          } else {
            Batcher.Result got = await(f);
            float[] want = ref.forwardTokens(batch(1 + r % 3, r), 1 + r % 3);
            assertAgrees(want, got.outputs(), 64, got.stats().batchRequests() == 1, "request " + r);
          }
        }
        assertTrue(refused > 0, "every request ran before close()");
      }
    }
  }

  @Test
  void stagesOnBatcherThreadsMaySubmitButNotClose() throws Exception {
    try (Model m = Model.load(MODEL);
        SessionOptions so = SessionOptions.create();
        BatcherOptions options = BatcherOptions.create()) {
      so.threads(1);
      // The wait makes sure the stages below are attached before their future completes.
      options.sessions(1).maxWait(Duration.ofMillis(200)).sessionOptions(so);
      try (Batcher b = Batcher.create(m, options)) {
        float[] want = b.forwardTokens(batch(2, 5), 2);
        CompletableFuture<String> thread = new CompletableFuture<>();
        CompletableFuture<Batcher.Result> chained =
            b.submitTokens(batch(1, 0), 1)
                .thenCompose(
                    first -> {
                      thread.complete(Thread.currentThread().getName());
                      return b.submitTokens(batch(2, 5), 2);
                    });
        assertArrayEquals(want, await(chained).outputs());
        assertEquals("moert-batcher", thread.get(TIMEOUT_S, TimeUnit.SECONDS));

        CompletableFuture<Void> closing = b.submitTokens(batch(1, 0), 1).thenRun(b::close);
        CompletionException e =
            assertThrows(
                CompletionException.class,
                () -> closing.orTimeout(TIMEOUT_S, TimeUnit.SECONDS).join());
        assertTrue(e.getCause() instanceof MoertException, String.valueOf(e.getCause()));
        assertEquals(
            CapiConstants.MOERT_ERR_INVALID_STATE, ((MoertException) e.getCause()).getCode());
        assertTrue(!b.isClosed());
        // A blocking call on this batcher from such a stage would wait for the session the stage
        // holds: it is refused instead.
        CompletableFuture<float[]> blocking =
            b.submitTokens(batch(1, 0), 1).thenApply(r -> b.forwardTokens(batch(2, 5), 2));
        CompletionException refused =
            assertThrows(
                CompletionException.class,
                () -> blocking.orTimeout(TIMEOUT_S, TimeUnit.SECONDS).join());
        assertTrue(
            refused.getCause() instanceof MoertException, String.valueOf(refused.getCause()));
        assertEquals(
            CapiConstants.MOERT_ERR_INVALID_STATE,
            ((MoertException) refused.getCause()).getCode());
        assertArrayEquals(want, await(b.submitTokens(batch(2, 5), 2)).outputs());
      }
    }
  }
  /**
   * close() on one thread while stages on the batcher's thread call the batcher (a blocking
   * forward, isClosed, counters): close() waits for the thread the stages run on, so their calls
   * must not wait for close() in turn. Every stage ends (with its answer or
   * MOERT_ERR_INVALID_STATE), close() returns, and isClosed() says so.
   */
  @Test
  void closeWhileStagesCallTheBatcherEnds() throws Exception {
    try (Model m = Model.load(MODEL);
        SessionOptions so = SessionOptions.create();
        BatcherOptions options = BatcherOptions.create()) {
      so.threads(1);
      // The wait lets every stage attach before its request is answered: the stages then run on
      // the batcher's thread.
      options.sessions(1).maxWait(Duration.ofMillis(20)).sessionOptions(so);
      Batcher b = Batcher.create(m, options);
      CompletableFuture<Void> started = new CompletableFuture<>();
      List<CompletableFuture<Object>> stages = new ArrayList<>();
      for (int i = 0; i < 30; i++) {
        final int kind = i % 3;
        stages.add(
            b.submitTokens(batch(1, i), 1)
                .thenApply(
                    r -> {
                      started.complete(null);
                      try {
                        Thread.sleep(20);
                      } catch (InterruptedException e) {
                        Thread.currentThread().interrupt();
                      }
                      if (kind == 0) return b.forwardTokens(batch(1, 0), 1);
                      if (kind == 1) return b.isClosed();
                      return b.counters();
                    }));
      }
      started.get(TIMEOUT_S, TimeUnit.SECONDS);
      CompletableFuture<Void> closed = CompletableFuture.runAsync(b::close);
      closed.get(TIMEOUT_S, TimeUnit.SECONDS);
      assertTrue(b.isClosed());
      for (CompletableFuture<Object> stage : stages) {
        try {
          stage.get(TIMEOUT_S, TimeUnit.SECONDS);
        } catch (ExecutionException e) {
          assertTrue(e.getCause() instanceof MoertException, String.valueOf(e.getCause()));
          assertEquals(
              CapiConstants.MOERT_ERR_INVALID_STATE, ((MoertException) e.getCause()).getCode());
        }
      }
    }
  }
}

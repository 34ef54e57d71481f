package dev.moert;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import org.junit.jupiter.api.Test;

/**
 * The batcher from many threads: answers agree with solo calls (bit for bit where a pass carried
 * one request, within {@link #TOLERANCE} where requests shared it), errors stay with their caller.
 */
class BatcherTest {
  private static final String MODEL = System.getProperty("moert.test.model");

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
      assertThrows(MoertException.class, () -> b.forwardHidden(new float[4], 1));
      assertEquals(64, b.forwardTokens(batch(1, 0), 1).length);
      assertEquals(4, b.counters().requests());
      assertEquals(3, b.counters().failed());
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
      try (Model m = Model.load(MODEL);
          SessionOptions training = SessionOptions.create().mode(CapiConstants.MOERT_MODE_TRAINING)) {
        o.sessionOptions(training);
        MoertException e = assertThrows(MoertException.class, () -> Batcher.create(m, o));
        assertEquals(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, e.getCode());
      }
    }
  }
}

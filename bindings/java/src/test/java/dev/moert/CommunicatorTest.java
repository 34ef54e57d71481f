package dev.moert;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.time.Duration;
import org.junit.jupiter.api.Test;

/**
 * Communicators from Java: a one-rank MPI job (the test runs without mpirun) attached to a
 * session, and NCCL's refusals without a GPU. One test for all of MPI: moert finalises MPI with
 * the last communicator, and MPI cannot be initialised twice in a process.
 */
class CommunicatorTest {
  private static final String MODEL = System.getProperty("moert.test.model");

  private static void expectCode(int code, org.junit.jupiter.api.function.Executable call) {
    MoertException e = assertThrows(MoertException.class, call);
    assertEquals(code, e.getCode(), e.getMessage());
  }

  @Test
  void mpiSingletonAttachedToASession() {
    SessionOptions options = SessionOptions.create();
    Communicator closed;
    try (Communicator comm = Communicator.mpiWithTimeout(30.0)) {
      closed = comm;
      assertEquals(0, comm.rank());
      assertEquals(1, comm.size());
      comm.barrier();
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> comm.timeout(-1));
      comm.timeout(30);
      // One rank: the sum over ranks is the rank's own values, bit for bit, in place.
      double[] data = {1.5, -2.25, 3e300, Double.MIN_VALUE};
      double[] want = data.clone();
      comm.allReduceSum(data);
      assertArrayEquals(want, data);
      comm.allReduceSum(new double[0]);
      // Null reaches the library, which refuses it on every rank (a NullPointerException on one
      // rank would leave the others waiting in the collective).
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> comm.allReduceSum(null));
      expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> options.communicator(comm, 2));
      options.communicator(comm, 1);
    }
    try (Model model = Model.load(MODEL);
        Session session = Session.create(model, options)) {
      assertEquals(64, session.forwardTokens(new int[] {1, 2, 3, 4}, 1).length);
      // Figures of time, never negative; all zero again after resetMetrics.
      Session.Profile p = session.profile();
      for (Duration d : new Duration[] {p.dispatch(), p.combine(), p.experts(), p.gradients()}) {
        assertFalse(d.isNegative(), p.toString());
      }
      session.resetMetrics();
      assertEquals(
          new Session.Profile(Duration.ZERO, Duration.ZERO, Duration.ZERO, Duration.ZERO),
          session.profile());
    }
    options.close(); // the last reference: MPI is finalised
    expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, Communicator::mpi);
    expectCode(CapiConstants.MOERT_ERR_INVALID_STATE, () -> closed.allReduceSum(new double[1]));
    assertEquals("MOERT_ERR_COMM", Moert.codeName(CapiConstants.MOERT_ERR_COMM));
  }

  @Test
  void ncclRefusedWithoutAGpu() {
    expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Communicator.nccl(new byte[5], 0, 1, 0));
    expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Communicator.mpi(0L));
    // A creation timeout out of range is refused before MPI or NCCL is touched.
    expectCode(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, () -> Communicator.mpiWithTimeout(0.0));
    expectCode(
        CapiConstants.MOERT_ERR_INVALID_ARGUMENT,
        () -> Communicator.ncclWithTimeout(new byte[128], 0, 1, 0, -1.0));
    byte[] id;
    try {
      id = Communicator.ncclUniqueId();
    } catch (MoertException e) {
      assertEquals(CapiConstants.MOERT_ERR_UNSUPPORTED, e.getCode(), e.getMessage());
      id = new byte[Communicator.NCCL_UNIQUE_ID_BYTES];
    }
    assertEquals(Communicator.NCCL_UNIQUE_ID_BYTES, id.length);
    try (Communicator c = Communicator.nccl(id, 0, 1, 0)) {
      assertTrue(c.size() == 1, "a GPU is here");
    } catch (MoertException e) {
      assertEquals(CapiConstants.MOERT_ERR_UNSUPPORTED, e.getCode(), e.getMessage());
    }
  }
}

package dev.moert;

import java.nio.ByteBuffer;
import java.nio.DoubleBuffer;

/**
 * Connects the processes ("ranks") of one job, for sessions that share their work across them
 * (expert and data parallelism): over MPI ({@link #mpi()}) or NCCL ({@link #nccl}). moert.h says
 * which calls are collective, how long a collective waits ({@link #timeout}), what MPI's lifetime
 * is and how to launch a job with mpirun. May be used from several threads; collectives must
 * reach every rank in the same order. {@link SessionOptions#communicator} attaches it to sessions.
 * {@link #close()} releases this handle's reference: session options and sessions that hold the
 * communicator keep it alive.
 */
public final class Communicator extends NativeHandle<SWIGTYPE_p_moert_comm> {

  /** Bytes of an NCCL unique id. */
  public static final int NCCL_UNIQUE_ID_BYTES = CapiConstants.MOERT_NCCL_UNIQUE_ID_BYTES;

  private Communicator(SWIGTYPE_p_moert_comm ptr) {
    super("communicator", ptr, () -> Capi.moert_comm_free(ptr));
  }

  /**
   * An MPI communicator over MPI_COMM_WORLD, initialising MPI when the process has not (a program
   * started without mpirun is a job of one rank). Collective.
   */
  public static Communicator mpi() {
    Moert.load();
    SWIGTYPE_p_moert_comm[] out = new SWIGTYPE_p_moert_comm[1];
    MoertException.check(Capi.moert_comm_create_mpi(0L, out));
    return new Communicator(out[0]);
  }

  /**
   * As {@link #mpi()}, with the communicator's timeout in seconds (more than 0 and at most a
   * year): the creation waits at most that long for the other ranks, and the collectives start
   * with it, as {@link #timeout(double)} would set it. A job run with a short timeout then fails
   * within it when a rank never comes to the creation.
   */
  public static Communicator mpiWithTimeout(double seconds) {
    Moert.load();
    SWIGTYPE_p_moert_comm[] out = new SWIGTYPE_p_moert_comm[1];
    MoertException.check(Capi.moert_comm_create_mpi_with_timeout(0L, seconds, out));
    return new Communicator(out[0]);
  }

  /**
   * An MPI communicator over a duplicate of the host's communicator: {@code commAddress} is the
   * native address of an Open MPI {@code MPI_Comm} (from the host's own native code). Collective
   * over that communicator.
   */
  public static Communicator mpi(long commAddress) {
    if (commAddress == 0) {
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "MPI_Comm address is 0");
    }
    Moert.load();
    SWIGTYPE_p_moert_comm[] out = new SWIGTYPE_p_moert_comm[1];
    MoertException.check(Capi.moert_comm_create_mpi(commAddress, out));
    return new Communicator(out[0]);
  }

  /** A fresh NCCL unique id; rank 0 makes it and ships it to the other ranks by any means. */
  public static byte[] ncclUniqueId() {
    Moert.load();
    ByteBuffer id = ByteBuffer.allocateDirect(NCCL_UNIQUE_ID_BYTES);
    MoertException.check(Capi.moert_comm_nccl_unique_id(id));
    byte[] bytes = new byte[NCCL_UNIQUE_ID_BYTES];
    id.get(bytes);
    return bytes;
  }

  /** Rank {@code rank} of an NCCL communicator of {@code size} ranks on CUDA device {@code device}. */
  public static Communicator nccl(byte[] id, int rank, int size, int device) {
    Moert.load();
    ByteBuffer in = direct(id);
    SWIGTYPE_p_moert_comm[] out = new SWIGTYPE_p_moert_comm[1];
    MoertException.check(Capi.moert_comm_create_nccl(in, rank, size, device, out));
    return new Communicator(out[0]);
  }

  /**
   * As {@link #nccl(byte[], int, int, int)}, with the communicator's timeout in seconds for the
   * creation and the collectives after it (see {@link #mpiWithTimeout(double)}).
   */
  public static Communicator ncclWithTimeout(
      byte[] id, int rank, int size, int device, double seconds) {
    Moert.load();
    ByteBuffer in = direct(id);
    SWIGTYPE_p_moert_comm[] out = new SWIGTYPE_p_moert_comm[1];
    MoertException.check(
        Capi.moert_comm_create_nccl_with_timeout(in, rank, size, device, seconds, out));
    return new Communicator(out[0]);
  }

  /** The id as a direct buffer; null stays null, for the library to refuse on every rank. */
  private static ByteBuffer direct(byte[] id) {
    if (id == null) {
      return null;
    }
    ByteBuffer in = ByteBuffer.allocateDirect(id.length);
    in.put(id);
    return in;
  }

  /** This process's rank in [0, size()). */
  public int rank() {
    int[] out = new int[1];
    try (Use u = use()) {
      MoertException.check(Capi.moert_comm_rank(u.ptr(), out));
    }
    return out[0];
  }

  /** The number of ranks. */
  public int size() {
    int[] out = new int[1];
    try (Use u = use()) {
      MoertException.check(Capi.moert_comm_size(u.ptr(), out));
    }
    return out[0];
  }

  /**
   * Seconds every collective waits before it fails with MOERT_ERR_COMM (default 600). Local to
   * this rank.
   */
  public Communicator timeout(double seconds) {
    try (Use u = use()) {
      MoertException.check(Capi.moert_comm_set_timeout(u.ptr(), seconds));
    }
    return this;
  }

  /** Blocks until every rank has called it. Collective. */
  public void barrier() {
    try (Use u = use()) {
      MoertException.check(Capi.moert_comm_barrier(u.ptr()));
    }
  }

  /**
   * Replaces each {@code data[i]}, in place, by the sum over ranks of every rank's {@code
   * data[i]}, added in rank order (((x0 + x1) + x2) + ...), so that every rank gets the same bits
   * on every run: for a host's own figures, such as a loss summed over the rows each rank
   * evaluated. Collective: every rank passes an array of the same length (an empty one is a no-op
   * on every rank). MOERT_ERR_UNSUPPORTED on an NCCL communicator, whose collectives move device
   * memory; MOERT_ERR_COMM on timeout or a broken communicator. {@code data} is changed only when
   * the call succeeds.
   */
  public void allReduceSum(double[] data) {
    // A copy, so that a failed collective leaves the caller's values as they were. Null still
    // meets the other ranks, as an empty array: their lengths then differ and every rank fails,
    // rather than the others waiting for this one; where every rank passed null or nothing, the
    // null is refused afterwards.
    DoubleBuffer staged = DoubleBuffer.wrap(data == null ? new double[0] : data.clone());
    try (Use u = use()) {
      MoertException.check(Capi.moert_comm_all_reduce_sum(u.ptr(), staged));
    }
    if (data == null) {
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "data is null");
    }
    staged.get(data);
  }
}

package dev.moert;

import java.lang.ref.Cleaner;
import java.lang.ref.Reference;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.locks.ReentrantReadWriteLock;

/**
 * A C handle that is safe to close while other threads use it: calls hold the read lock, close()
 * takes the write lock, so the C free function never races with a call (moert.h forbids that)
 * and a call after close() throws instead of touching freed memory. A second close() does
 * nothing; a handle nobody closed is freed by a Cleaner once it is unreachable.
 *
 * <p>The C pointer is reachable only through a {@link Use}, so no call can skip the lock.
 *
 * @param <P> the SWIG proxy type of the C pointer
 */
abstract class NativeHandle<P> implements AutoCloseable {
  private static final Cleaner CLEANER = Cleaner.create();

  /** Frees the C object at most once; refers to nothing but the pointer. */
  private static final class Release implements Runnable {
    private final Runnable free;

    Release(Runnable free) {
      this.free = free;
    }

    @Override
    public void run() {
      free.run();
    }
  }

  /** A call in progress: it gives the pointer, and closing it releases the read lock. */
  final class Use implements AutoCloseable {
    P ptr() {
      return ptr;
    }

    @Override
    public void close() {
      lock.readLock().unlock();
      Reference.reachabilityFence(NativeHandle.this);
    }
  }

  private final ReentrantReadWriteLock lock = new ReentrantReadWriteLock();
  private final P ptr;
  private final Cleaner.Cleanable cleanable;
  private final String what;
  private boolean closed;
  // Set when close() begins, before it waits for the write lock.
  private volatile boolean closing;

  /** free must not refer to this handle (it runs from the Cleaner once the handle is gone). */
  NativeHandle(String what, P ptr, Runnable free) {
    this.what = what;
    this.ptr = ptr;
    this.cleanable = CLEANER.register(this, new Release(free));
  }

  /**
   * Starts a call; throws MOERT_ERR_INVALID_STATE after close(), and once close() has begun on
   * another thread: close() may be waiting for the calling thread (a batcher's callback thread,
   * whose stage calls this batcher), so the call must not wait for close() in turn.
   */
  final Use use() {
    readLock();
    if (closed) {
      lock.readLock().unlock();
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_STATE, what + " is closed");
    }
    return new Use();
  }

  /**
   * As use(), but never waits for the lock: while close() runs on another thread it throws
   * MOERT_ERR_INVALID_STATE at once. For calls that return at once, which may run on a thread
   * that close() itself is waiting for (a batcher's callback).
   */
  final Use tryUse() {
    if (!lock.readLock().tryLock()) {
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_STATE, what + " is closing");
    }
    if (closed) {
      lock.readLock().unlock();
      throw new MoertException(CapiConstants.MOERT_ERR_INVALID_STATE, what + " is closed");
    }
    return new Use();
  }

  /** Releases the handle after the calls in flight; later calls do nothing. */
  @Override
  public final void close() {
    if (!lock.isWriteLockedByCurrentThread()) {
      checkClose();
    }
    closing = true;
    lock.writeLock().lock();
    try {
      if (!closed) {
        closed = true;
        cleanable.clean();
      }
    } finally {
      lock.writeLock().unlock();
    }
  }

  /**
   * Throws when close() must not run on the calling thread (unless that thread is closing the
   * handle already: then close() returns at once); the default allows it anywhere.
   */
  void checkClose() {}

  /** Whether close() has run or is running. */
  public final boolean isClosed() {
    if (closing) {
      return true;
    }
    try {
      readLock();
    } catch (MoertException e) {
      return true;
    }
    try {
      return closed;
    } finally {
      lock.readLock().unlock();
    }
  }

  // The read lock, waited for in slices so that a close() begun meanwhile ends the wait. Not
  // interruptible, as a call is not: an interrupt is kept for the caller.
  private void readLock() {
    boolean interrupted = false;
    try {
      while (true) {
        try {
          if (lock.readLock().tryLock(10, TimeUnit.MILLISECONDS)) {
            return;
          }
        } catch (InterruptedException e) {
          interrupted = true;
        }
        if (closing) {
          throw new MoertException(CapiConstants.MOERT_ERR_INVALID_STATE, what + " is closing");
        }
      }
    } finally {
      if (interrupted) {
        Thread.currentThread().interrupt();
      }
    }
  }

  /** An index or count for a uint32_t parameter of the C ABI. */
  static long checkUint32(String what, long value) {
    if (value < 0 || value > 0xFFFFFFFFL) {
      throw new MoertException(
          CapiConstants.MOERT_ERR_INVALID_ARGUMENT, what + " " + value + " out of range");
    }
    return value;
  }
}

package moert

import (
	"fmt"
	"runtime"
	"time"

	"moert.dev/moert/internal/capi"
)

// ErrComm is the code of a collective that failed or timed out; the communicator is then broken
// and every later collective fails at once.
const ErrComm Code = Code(capi.MOERT_ERR_COMM)

// NCCLUniqueIDBytes is the length of an NCCL unique id.
const NCCLUniqueIDBytes = int(capi.MOERT_NCCL_UNIQUE_ID_BYTES)

// Communicator connects the processes ("ranks") of one job, for sessions that share their work
// across them (expert and data parallelism; see moert.h for the collective rules, MPI's lifetime
// and how to launch with mpirun). It is safe for use by several goroutines; collectives must
// reach every rank in the same order.
type Communicator struct {
	g   guard
	ptr capi.Struct_SS_moert_comm
}

func newCommunicator(create func(*uintptr) capi.Struct_SS_moert_status) (*Communicator, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	var p uintptr
	if err := check(create(&p)); err != nil {
		return nil, err
	}
	c := &Communicator{g: guard{what: "communicator"}, ptr: capi.SwigcptrStruct_SS_moert_comm(p)}
	runtime.SetFinalizer(c, (*Communicator).Close)
	return c, nil
}

// CommOption adjusts a communicator's creation.
type CommOption func(*commConfig)

type commConfig struct {
	timeout time.Duration // 0: the library's default (10 minutes)
}

// CommTimeout makes the creation wait at most d for the other ranks (> 0 and at most a year), and
// the communicator's collectives start with it, as SetTimeout would set it: a job run with a short
// timeout fails within it when a rank never comes to the creation. The default is 10 minutes.
func CommTimeout(d time.Duration) CommOption {
	return func(c *commConfig) { c.timeout = d }
}

// commTimeout is the creation timeout the options ask for, or false for the default. A zero or
// negative duration is passed on for the library to refuse.
func commTimeout(opts []CommOption) (float64, bool) {
	var c commConfig
	given := false
	for _, o := range opts {
		o(&c)
		given = true
	}
	return c.timeout.Seconds(), given
}

// NewMPICommunicator creates an MPI communicator over MPI_COMM_WORLD, initialising MPI when the
// process has not (a program started without mpirun is a job of one rank). Collective.
func NewMPICommunicator(opts ...CommOption) (*Communicator, error) {
	return newCommunicator(func(out *uintptr) capi.Struct_SS_moert_status {
		if t, ok := commTimeout(opts); ok {
			return capi.Moert_comm_create_mpi_with_timeout(0, t, out)
		}
		return capi.Moert_comm_create_mpi(0, out)
	})
}

// NewMPICommunicatorFromHandle creates an MPI communicator over a duplicate of the host's
// communicator: commAddress is the address of an Open MPI MPI_Comm in C memory (for example a
// C.MPI_Comm variable of a cgo program). Collective over that communicator.
func NewMPICommunicatorFromHandle(commAddress uintptr, opts ...CommOption) (*Communicator, error) {
	if commAddress == 0 {
		return nil, &Error{Code: ErrInvalidArgument, Message: "the MPI_Comm address is 0"}
	}
	return newCommunicator(func(out *uintptr) capi.Struct_SS_moert_status {
		if t, ok := commTimeout(opts); ok {
			return capi.Moert_comm_create_mpi_with_timeout(commAddress, t, out)
		}
		return capi.Moert_comm_create_mpi(commAddress, out)
	})
}

// NCCLUniqueID makes a fresh NCCL unique id. Rank 0 calls it and ships the bytes to the other
// ranks by any means.
func NCCLUniqueID() ([]byte, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	id := make([]byte, NCCLUniqueIDBytes)
	if err := check(capi.Moert_comm_nccl_unique_id(id)); err != nil {
		return nil, err
	}
	return id, nil
}

// NewNCCLCommunicator creates rank `rank` of an NCCL communicator of `size` ranks on CUDA device
// `device`, from the id every rank passes. Collective.
func NewNCCLCommunicator(id []byte, rank, size, device int, opts ...CommOption) (*Communicator, error) {
	r, err := int32Arg("rank", rank)
	if err != nil {
		return nil, err
	}
	n, err := int32Arg("size", size)
	if err != nil {
		return nil, err
	}
	d, err := int32Arg("device", device)
	if err != nil {
		return nil, err
	}
	return newCommunicator(func(out *uintptr) capi.Struct_SS_moert_status {
		if t, ok := commTimeout(opts); ok {
			return capi.Moert_comm_create_nccl_with_timeout(id, r, n, d, t, out)
		}
		return capi.Moert_comm_create_nccl(id, r, n, d, out)
	})
}

func int32Arg(what string, v int) (int32, error) {
	if v < -1<<31 || v > 1<<31-1 {
		return 0, &Error{Code: ErrInvalidArgument, Message: fmt.Sprintf("%s %d out of range", what, v)}
	}
	return int32(v), nil
}

// Close releases this handle's reference; session options and sessions that hold the
// communicator keep it alive. A second Close does nothing.
func (c *Communicator) Close() error {
	if c == nil {
		return nil
	}
	c.g.close(func() {
		capi.Moert_comm_free(c.ptr)
		runtime.SetFinalizer(c, nil)
	})
	return nil
}

func (c *Communicator) int32Query(call func(*int32) capi.Struct_SS_moert_status) (int, error) {
	if err := c.g.enter(); err != nil {
		return 0, err
	}
	defer c.g.leave()
	var v int32
	if err := check(call(&v)); err != nil {
		return 0, err
	}
	return int(v), nil
}

// Rank is this process's rank in [0, Size).
func (c *Communicator) Rank() (int, error) {
	return c.int32Query(func(v *int32) capi.Struct_SS_moert_status { return capi.Moert_comm_rank(c.ptr, v) })
}

// Size is the number of ranks.
func (c *Communicator) Size() (int, error) {
	return c.int32Query(func(v *int32) capi.Struct_SS_moert_status { return capi.Moert_comm_size(c.ptr, v) })
}

// SetTimeout sets how long every collective waits before it fails with ErrComm (default 10
// minutes). Local to this rank.
func (c *Communicator) SetTimeout(d time.Duration) error {
	if err := c.g.enter(); err != nil {
		return err
	}
	defer c.g.leave()
	return check(capi.Moert_comm_set_timeout(c.ptr, d.Seconds()))
}

// Barrier blocks until every rank has called it. Collective.
func (c *Communicator) Barrier() error {
	if err := c.g.enter(); err != nil {
		return err
	}
	defer c.g.leave()
	return check(capi.Moert_comm_barrier(c.ptr))
}

// AllReduceSum replaces each data[i], in place, by the sum over ranks of every rank's data[i],
// added in rank order (((x0 + x1) + x2) + ...), so that every rank gets the same bits on every
// run: for a host's own figures, such as a loss summed over the rows each rank evaluated.
// Collective: every rank passes the same length (an empty or nil slice is a no-op on every rank).
// ErrUnsupported on an NCCL communicator, whose collectives move device memory; ErrComm on
// timeout or a broken communicator. data is changed only when the call succeeds.
func (c *Communicator) AllReduceSum(data []float64) error {
	if err := c.g.enter(); err != nil {
		return err
	}
	defer c.g.leave()
	own := ownFloat64s(data)
	if err := check(capi.Moert_comm_all_reduce_sum(c.ptr, own)); err != nil {
		return err
	}
	copy(data, own)
	return nil
}

// SetCommunicator attaches c with an expert-parallel size (>= 1, dividing c's size); nil with 1
// detaches. The options keep their own reference to the communicator.
func (o *SessionOptions) SetCommunicator(c *Communicator, expertParallel int) error {
	ep, err := int32Arg("expert-parallel size", expertParallel)
	if err != nil {
		return err
	}
	var ptr capi.Struct_SS_moert_comm = capi.SwigcptrStruct_SS_moert_comm(0)
	if c != nil {
		if err := c.g.enter(); err != nil {
			return err
		}
		defer c.g.leave()
		ptr = c.ptr
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_options_set_comm(o.ptr, ptr, ep)
	})
}

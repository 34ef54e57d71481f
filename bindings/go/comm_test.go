package moert

import (
	"errors"
	"math"
	"testing"
	"time"
)

// One test for all of MPI: moert finalises MPI with the last communicator, and MPI cannot be
// initialised twice in a process.
func TestCommunicatorMPISingleton(t *testing.T) {
	// A creation timeout out of range is refused before MPI is touched.
	for _, d := range []time.Duration{0, -time.Second, 400 * 24 * time.Hour} {
		if _, err := NewMPICommunicator(CommTimeout(d)); !errors.Is(err, &Error{Code: ErrInvalidArgument}) {
			t.Fatalf("CommTimeout(%v) = %v, want ErrInvalidArgument", d, err)
		}
	}
	// CTest sets OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM): Open MPI refuses to start as root without.
	c, err := NewMPICommunicator(CommTimeout(30 * time.Second))
	if err != nil {
		t.Fatalf("NewMPICommunicator: %v", err)
	}
	rank, err := c.Rank()
	if err != nil || rank != 0 {
		t.Fatalf("Rank = %d, %v", rank, err)
	}
	size, err := c.Size()
	if err != nil || size != 1 {
		t.Fatalf("Size = %d, %v", size, err)
	}
	if err := c.Barrier(); err != nil {
		t.Fatalf("Barrier: %v", err)
	}
	if err := c.SetTimeout(0); !errors.Is(err, &Error{Code: ErrInvalidArgument}) {
		t.Errorf("SetTimeout(0) = %v, want ErrInvalidArgument", err)
	}
	if err := c.SetTimeout(30 * time.Second); err != nil {
		t.Errorf("SetTimeout: %v", err)
	}
	// One rank: the sum over ranks is the rank's own values, bit for bit, in place.
	data := []float64{1.5, -2.25, 3e300, 0x1p-1074}
	want := append([]float64(nil), data...)
	if err := c.AllReduceSum(data); err != nil {
		t.Fatalf("AllReduceSum: %v", err)
	}
	for i := range data {
		if math.Float64bits(data[i]) != math.Float64bits(want[i]) {
			t.Errorf("AllReduceSum on one rank: data[%d] = %v, want %v", i, data[i], want[i])
		}
	}
	// Memory inside an object that also holds Go pointers, and empty or nil slices.
	holder := struct {
		next *int
		buf  [3]float64
	}{buf: [3]float64{4, 5, 6}}
	if err := c.AllReduceSum(holder.buf[1:]); err != nil || holder.buf != [3]float64{4, 5, 6} {
		t.Errorf("AllReduceSum on a struct's array = %v, %v", holder.buf, err)
	}
	if err := c.AllReduceSum([]float64{}); err != nil {
		t.Errorf("AllReduceSum(empty) = %v", err)
	}
	if err := c.AllReduceSum(nil); err != nil {
		t.Errorf("AllReduceSum(nil) = %v", err)
	}

	opts, err := NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	if err := opts.SetCommunicator(c, 2); !errors.Is(err, &Error{Code: ErrInvalidArgument}) {
		t.Errorf("SetCommunicator(c, 2) on one rank = %v, want ErrInvalidArgument", err)
	}
	if err := opts.SetCommunicator(c, 1); err != nil {
		t.Fatalf("SetCommunicator: %v", err)
	}
	c.Close() // the options keep theirs
	if _, err := c.Rank(); !errors.Is(err, &Error{Code: ErrInvalidState}) {
		t.Errorf("Rank after Close = %v, want ErrInvalidState", err)
	}
	m := mustModel(t)
	s, err := NewSession(m, opts)
	if err != nil {
		t.Fatalf("NewSession with a one-rank communicator: %v", err)
	}
	if _, err := s.ForwardTokens([]int32{1, 2, 3, 4}, 1); err != nil {
		t.Errorf("ForwardTokens: %v", err)
	}
	// Figures of time, never negative; all zero again after ResetMetrics.
	p, err := s.Profile()
	if err != nil || p.Dispatch < 0 || p.Combine < 0 || p.Experts < 0 || p.Gradients < 0 {
		t.Errorf("Profile = %+v, %v", p, err)
	}
	if err := s.ResetMetrics(); err != nil {
		t.Fatal(err)
	}
	if p, err := s.Profile(); err != nil || p != (Profile{}) {
		t.Errorf("Profile after ResetMetrics = %+v, %v; want zeros", p, err)
	}
	s.Close()
	opts.Close() // the last reference: MPI is finalised

	if _, err := NewMPICommunicator(); !errors.Is(err, &Error{Code: ErrInvalidState}) {
		t.Errorf("a second MPI communicator after finalisation = %v, want ErrInvalidState", err)
	}
	if err := c.AllReduceSum([]float64{1}); !errors.Is(err, &Error{Code: ErrInvalidState}) {
		t.Errorf("AllReduceSum after Close = %v, want ErrInvalidState", err)
	}
	if ErrComm.String() != "MOERT_ERR_COMM" {
		t.Errorf("ErrComm = %v", ErrComm)
	}
}

func TestCommunicatorNCCLRefusals(t *testing.T) {
	if _, err := NewNCCLCommunicator(make([]byte, 5), 0, 1, 0); !errors.Is(err, &Error{Code: ErrInvalidArgument}) {
		t.Errorf("a short id = %v, want ErrInvalidArgument", err)
	}
	if _, err := NewNCCLCommunicator(make([]byte, NCCLUniqueIDBytes), 0, 1, 0, CommTimeout(0)); !errors.Is(err, &Error{Code: ErrInvalidArgument}) {
		t.Errorf("a zero timeout = %v, want ErrInvalidArgument", err)
	}
	if _, err := NewMPICommunicatorFromHandle(0); !errors.Is(err, &Error{Code: ErrInvalidArgument}) {
		t.Errorf("a zero MPI_Comm address = %v, want ErrInvalidArgument", err)
	}
	// Without a GPU (or a CUDA plugin with NCCL) an NCCL communicator is refused clearly.
	id, err := NCCLUniqueID()
	if err != nil {
		if !errors.Is(err, &Error{Code: ErrUnsupported}) {
			t.Fatalf("NCCLUniqueID = %v, want success or ErrUnsupported", err)
		}
		id = make([]byte, NCCLUniqueIDBytes)
	}
	if len(id) != NCCLUniqueIDBytes {
		t.Fatalf("id of %d bytes", len(id))
	}
	c, err := NewNCCLCommunicator(id, 0, 1, 0)
	if err == nil {
		c.Close() // a GPU is here
	} else if !errors.Is(err, &Error{Code: ErrUnsupported}) {
		t.Errorf("NewNCCLCommunicator = %v, want ErrUnsupported without a GPU", err)
	}
}

// A session alone spends no time waiting on other ranks: its profile is zero, before and after
// passes, and the figures' count is the library's.
func TestSessionProfileAlone(t *testing.T) {
	if ProfileFigures != 4 {
		t.Errorf("ProfileFigures = %d, want 4", ProfileFigures)
	}
	s := mustSession(t, mustModel(t), ModeInference, 1)
	for i := 0; i < 2; i++ {
		if p, err := s.Profile(); err != nil || p != (Profile{}) {
			t.Errorf("Profile of a session alone = %+v, %v; want zeros", p, err)
		}
		if _, err := s.ForwardTokens([]int32{1, 2, 3, 4}, 1); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	if _, err := s.Profile(); !errors.Is(err, &Error{Code: ErrInvalidState}) {
		t.Errorf("Profile after Close = %v, want ErrInvalidState", err)
	}
}

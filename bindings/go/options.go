package moert

import (
	"runtime"

	"moert.dev/moert/internal/capi"
)

// SessionOptions configures NewSession. Defaults: CPU, 1 thread, seed 0, inference mode. It must
// not be modified from two goroutines at once.
type SessionOptions struct {
	g   guard
	ptr capi.Struct_SS_moert_session_options
}

// NewSessionOptions creates options with the defaults.
func NewSessionOptions() (*SessionOptions, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	var p uintptr
	if err := check(capi.Moert_session_options_create(&p)); err != nil {
		return nil, err
	}
	o := &SessionOptions{g: guard{what: "session options"},
		ptr: capi.SwigcptrStruct_SS_moert_session_options(p)}
	runtime.SetFinalizer(o, (*SessionOptions).Close)
	return o, nil
}

// Close releases the options; a second Close does nothing.
func (o *SessionOptions) Close() error {
	if o == nil {
		return nil
	}
	o.g.close(func() {
		capi.Moert_session_options_free(o.ptr)
		runtime.SetFinalizer(o, nil)
	})
	return nil
}

func (o *SessionOptions) set(call func() capi.Struct_SS_moert_status) error {
	if err := o.g.enter(); err != nil {
		return err
	}
	defer o.g.leave()
	return check(call())
}

// SetDevice selects the device kind and index. Asking for CUDA is accepted here and refused by
// NewSession with ErrUnsupported when no CUDA backend can be loaded.
func (o *SessionOptions) SetDevice(device Device, index int) error {
	i, err := int32Arg("device index", index)
	if err != nil {
		return err
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_options_set_device(o.ptr, int32(device), i)
	})
}

// SetThreads sets the worker threads for the session's CPU work, 1 to 1024.
func (o *SessionOptions) SetThreads(threads int) error {
	n, err := index32("threads", threads)
	if err != nil {
		return err
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_options_set_threads(o.ptr, n)
	})
}

// SetSeed sets the seed for everything random the session does.
func (o *SessionOptions) SetSeed(seed uint64) error {
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_options_set_seed(o.ptr, seed)
	})
}

// SetMode selects inference or training.
func (o *SessionOptions) SetMode(mode Mode) error {
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_options_set_mode(o.ptr, int32(mode))
	})
}

// SetConfig sets a backend or training knob by name (see moert.h); an unknown key or a value it
// does not accept is ErrInvalidArgument.
func (o *SessionOptions) SetConfig(key, value string) error {
	if err := noNUL("config key or value", key+value); err != nil {
		return err
	}
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_session_options_set_config(o.ptr, key, value)
	})
}

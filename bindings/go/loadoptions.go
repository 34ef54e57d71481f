package moert

import (
	"runtime"

	"moert.dev/moert/internal/capi"
)

// ErrLimit is the code of a load refused by a load limit (LoadOptions, or the defaults), and of
// a request a batcher's full queue refuses (BatcherOptions.SetMaxQueuedRows).
const ErrLimit Code = Code(capi.MOERT_ERR_LIMIT)

// LoadOptions bounds what loading an untrusted file may cost; the limits are checked on the
// totals the description declares, before anything is allocated or read for the model, and a
// load over one fails with ErrLimit. Defaults (also those of LoadModel and LoadModelBytes): a
// model may hold 1 GiB of tensors (counted as fp32, whatever their source) and a load may read
// 4 GiB. It must not be modified from two goroutines at once.
type LoadOptions struct {
	g   guard
	ptr capi.Struct_SS_moert_load_options
}

// NewLoadOptions creates load options with the defaults.
func NewLoadOptions() (*LoadOptions, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	var p uintptr
	if err := check(capi.Moert_load_options_create(&p)); err != nil {
		return nil, err
	}
	o := &LoadOptions{g: guard{what: "load options"}, ptr: capi.SwigcptrStruct_SS_moert_load_options(p)}
	runtime.SetFinalizer(o, (*LoadOptions).Close)
	return o, nil
}

// Close releases the options; a second Close does nothing.
func (o *LoadOptions) Close() error {
	if o == nil {
		return nil
	}
	o.g.close(func() {
		capi.Moert_load_options_free(o.ptr)
		runtime.SetFinalizer(o, nil)
	})
	return nil
}

func (o *LoadOptions) set(call func() capi.Struct_SS_moert_status) error {
	if err := o.g.enter(); err != nil {
		return err
	}
	defer o.g.leave()
	return check(call())
}

// SetMaxMemory sets the bytes a loaded model may hold (its tensors as fp32, and a checkpoint's
// training state when a session loads it); never more than physical memory.
func (o *LoadOptions) SetMaxMemory(bytes uint64) error {
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_load_options_set_max_memory(o.ptr, bytes)
	})
}

// SetMaxFileBytes sets the bytes a load may read: the description and the external data it uses.
func (o *LoadOptions) SetMaxFileBytes(bytes uint64) error {
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_load_options_set_max_file_bytes(o.ptr, bytes)
	})
}

// SetConfineExternalData, when on, refuses (ErrInvalidModel) an external data file (a checkpoint's
// included) reached by a way out of the model's directory: without it a link there named as the
// data file makes any readable file the weights. Off by default, because content stores such as
// the Hugging Face hub cache link every file from elsewhere. moert.h (moert_load_options) says
// how it is checked, and what differs on a kernel without openat2.
func (o *LoadOptions) SetConfineExternalData(on bool) error {
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_load_options_set_confine_external_data(o.ptr, flag(on))
	})
}

// SetDescriptionOnly, when on, loads the description alone: no tensor is read or initialised and
// the external data file is not opened, so a model of any size loads in a scan of its
// description. Such a model answers the calls that describe it (layers, parameter counts, tensor
// info, resident bytes: what a full load would hold) and refuses sessions, batchers, saves and
// FP8 quantization (ErrInvalidArgument). moert.h (moert_load_options_set_description_only) says
// what is and is not checked.
func (o *LoadOptions) SetDescriptionOnly(on bool) error {
	return o.set(func() capi.Struct_SS_moert_status {
		return capi.Moert_load_options_set_description_only(o.ptr, flag(on))
	})
}

// withOptions runs f with the C pointer of opts (NULL for nil), holding opts open meanwhile.
func withOptions(opts *LoadOptions, f func(capi.Struct_SS_moert_load_options) error) error {
	if opts == nil {
		return f(capi.SwigcptrStruct_SS_moert_load_options(0))
	}
	if err := opts.g.enter(); err != nil {
		return err
	}
	defer opts.g.leave()
	return f(opts.ptr)
}

// LoadModelWithOptions is LoadModel within the limits of opts (nil: the defaults).
func LoadModelWithOptions(path string, opts *LoadOptions) (*Model, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	if err := noNUL("path", path); err != nil {
		return nil, err
	}
	var p uintptr
	err := withOptions(opts, func(o capi.Struct_SS_moert_load_options) error {
		return check(capi.Moert_model_load_file_with_options(path, o, &p))
	})
	if err != nil {
		return nil, err
	}
	return newModel(p), nil
}

// LoadModelBytesWithOptions is LoadModelBytes within the limits of opts (nil: the defaults).
func LoadModelBytesWithOptions(data []byte, externalDir string, opts *LoadOptions) (*Model, error) {
	if abiErr != nil {
		return nil, abiErr
	}
	if err := noNUL("external directory", externalDir); err != nil {
		return nil, err
	}
	var p uintptr
	err := withOptions(opts, func(o capi.Struct_SS_moert_load_options) error {
		return check(capi.Moert_model_load_buffer_with_options(data, externalDir, o, &p))
	})
	if err != nil {
		return nil, err
	}
	return newModel(p), nil
}

// LoadWithOptions is Load within the limits of opts too (nil: the session's own bound alone:
// what its architecture can hold).
func (s *Session) LoadWithOptions(path string, opts *LoadOptions) error {
	if err := noNUL("path", path); err != nil {
		return err
	}
	return withOptions(opts, func(o capi.Struct_SS_moert_load_options) error {
		return s.call(func() capi.Struct_SS_moert_status {
			return capi.Moert_session_load_with_options(s.ptr, path, o)
		})
	})
}

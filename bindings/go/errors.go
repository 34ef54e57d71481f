package moert

import (
	"fmt"

	"moert.dev/moert/internal/capi"
)

// Code is a moert status code (MOERT_ERR_* in moert.h).
type Code int32

// Status codes.
const (
	OK                 Code = Code(capi.MOERT_OK)
	ErrInvalidArgument Code = Code(capi.MOERT_ERR_INVALID_ARGUMENT)
	ErrInvalidModel    Code = Code(capi.MOERT_ERR_INVALID_MODEL)
	ErrIO              Code = Code(capi.MOERT_ERR_IO)
	ErrOutOfMemory     Code = Code(capi.MOERT_ERR_OUT_OF_MEMORY)
	ErrUnsupported     Code = Code(capi.MOERT_ERR_UNSUPPORTED)
	ErrInvalidState    Code = Code(capi.MOERT_ERR_INVALID_STATE)
	ErrNumeric         Code = Code(capi.MOERT_ERR_NUMERIC)
	ErrInternal        Code = Code(capi.MOERT_ERR_INTERNAL)
)

// String is the code's constant name, e.g. "MOERT_ERR_IO".
func (c Code) String() string { return capi.Moert_status_code_name(int32(c)) }

// Error is a failed moert call: the status code and the library's message.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("moert: %v: %s", e.Code, e.Message) }

// Is lets errors.Is match an *Error by code: errors.Is(err, &moert.Error{Code: moert.ErrIO}).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// check turns a status into an error (nil for success) and frees it.
func check(st capi.Struct_SS_moert_status) error {
	if st == nil || st.Swigcptr() == 0 {
		return nil
	}
	defer capi.Moert_status_free(st)
	return &Error{Code: Code(capi.Moert_status_code(st)), Message: capi.Moert_status_message(st)}
}

// abiErr is set at start-up when the loaded library implements another ABI.
var abiErr error

func init() {
	if got := capi.Moert_abi_version(); got != uint32(capi.MOERT_ABI_VERSION) {
		abiErr = &Error{Code: ErrUnsupported, Message: fmt.Sprintf(
			"libmoert implements ABI %d, this binding was built for ABI %d", got, capi.MOERT_ABI_VERSION)}
	}
}

// CheckABI reports whether the loaded libmoert implements the ABI this package was built for.
func CheckABI() error { return abiErr }

// ABIVersion is the ABI major of the loaded library.
func ABIVersion() uint32 { return capi.Moert_abi_version() }

// Version is the loaded library's version, "MAJOR.MINOR.PATCH".
func Version() string { return capi.Moert_version_string() }

// SchemaVersion is the major and minor of the model-description schema the library reads.
func SchemaVersion() (major, minor uint32) {
	capi.Moert_schema_version(&major, &minor)
	return major, minor
}

// Version numbers this package was built against.
const (
	BuiltABIVersion   uint32 = uint32(capi.MOERT_ABI_VERSION)
	BuiltVersionMajor uint32 = uint32(capi.MOERT_VERSION_MAJOR)
	BuiltVersionMinor uint32 = uint32(capi.MOERT_VERSION_MINOR)
	BuiltVersionPatch uint32 = uint32(capi.MOERT_VERSION_PATCH)
)

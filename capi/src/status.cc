#include "capi/src/status.h"

namespace moert::capi {

moert_status g_out_of_memory{MOERT_ERR_OUT_OF_MEMORY, "out of memory"};

moert_status* make_status(int32_t code, const std::string& message) noexcept {
  try {
    return new moert_status{code, message};
  } catch (...) {
    return &g_out_of_memory;
  }
}

}  // namespace moert::capi

extern "C" {

int32_t moert_status_code(const moert_status* status) { return status ? status->code : MOERT_OK; }

const char* moert_status_message(const moert_status* status) {
  return status ? status->message.c_str() : "";
}

void moert_status_free(moert_status* status) {
  if (status != &moert::capi::g_out_of_memory) delete status;
}

const char* moert_status_code_name(int32_t code) {
  switch (code) {
    case MOERT_OK:
      return "MOERT_OK";
    case MOERT_ERR_INVALID_ARGUMENT:
      return "MOERT_ERR_INVALID_ARGUMENT";
    case MOERT_ERR_INVALID_MODEL:
      return "MOERT_ERR_INVALID_MODEL";
    case MOERT_ERR_IO:
      return "MOERT_ERR_IO";
    case MOERT_ERR_OUT_OF_MEMORY:
      return "MOERT_ERR_OUT_OF_MEMORY";
    case MOERT_ERR_UNSUPPORTED:
      return "MOERT_ERR_UNSUPPORTED";
    case MOERT_ERR_INVALID_STATE:
      return "MOERT_ERR_INVALID_STATE";
    case MOERT_ERR_NUMERIC:
      return "MOERT_ERR_NUMERIC";
    case MOERT_ERR_INTERNAL:
      return "MOERT_ERR_INTERNAL";
    case MOERT_ERR_LIMIT:
      return "MOERT_ERR_LIMIT";
    default:
      return "MOERT_ERR_UNKNOWN";
  }
}

uint32_t moert_abi_version(void) { return MOERT_ABI_VERSION; }

#define MOERT_STR2(x) #x
#define MOERT_STR(x) MOERT_STR2(x)
const char* moert_version_string(void) {
  return MOERT_STR(MOERT_VERSION_MAJOR) "." MOERT_STR(MOERT_VERSION_MINOR) "." MOERT_STR(
      MOERT_VERSION_PATCH);
}

}  // extern "C"

#include "capi/src/status.h"

namespace moert::capi {

moert_status g_out_of_memory{MOERT_ERR_OUT_OF_MEMORY, "out of memory"};

std::string printable_utf8(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    // The length of a well-formed sequence at i (RFC 3629: no overlongs, no surrogates, nothing
    // above U+10FFFF), or 0.
    size_t len = 0;
    const unsigned char c = p[i];
    auto cont = [&](size_t k) { return i + k < n && (p[i + k] & 0xC0) == 0x80; };
    if (c < 0x80) {
      // A control character (a newline in a layer's name, say) would break the message's line.
      len = c >= 0x20 && c != 0x7F ? 1 : 0;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = cont(1) ? 2 : 0;
    } else if (c >= 0xE0 && c <= 0xEF) {
      const bool ok2 = cont(1) && (c != 0xE0 || p[i + 1] >= 0xA0) && (c != 0xED || p[i + 1] < 0xA0);
      len = ok2 && cont(2) ? 3 : 0;
    } else if (c >= 0xF0 && c <= 0xF4) {
      const bool ok2 = cont(1) && (c != 0xF0 || p[i + 1] >= 0x90) && (c != 0xF4 || p[i + 1] < 0x90);
      len = ok2 && cont(2) && cont(3) ? 4 : 0;
    }
    if (len == 0) {
      static const char hex[] = "0123456789ABCDEF";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
      ++i;
    } else {
      out.append(text, i, len);
      i += len;
    }
  }
  return out;
}

moert_status* make_status(int32_t code, const std::string& message) noexcept {
  try {
    return new moert_status{code, printable_utf8(message)};
  } catch (...) {
    return &g_out_of_memory;
  }
}

moert_status* status_of(std::exception_ptr error) noexcept {
  return guarded([&] { std::rethrow_exception(error); });
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
    case MOERT_ERR_COMM:
      return "MOERT_ERR_COMM";
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

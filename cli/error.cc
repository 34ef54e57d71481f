#include "cli/error.h"

#include <algorithm>
#include <cstdio>

namespace moert_cli {
namespace {

std::string& current_command() {
  static std::string name = "moert";
  return name;
}

}  // namespace

void set_command_name(const std::string& name) { current_command() = name; }

const std::string& command_name() { return current_command(); }

namespace {

// The length of the well-formed UTF-8 sequence at text[i] (RFC 3629: no overlong forms, no
// surrogates, nothing past U+10FFFF), or 0.
size_t utf8_sequence(const std::string& text, size_t i) {
  const auto at = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char c = at(i);
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + n > text.size() || at(i + 1) < lo || at(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if (at(i + k) < 0x80 || at(i + k) > 0xBF) return 0;
  return n;
}

}  // namespace

std::string printable(const std::string& text) {
  std::string line;
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    const size_t n = c >= 0x80 ? utf8_sequence(text, i) : 0;
    if ((c >= 0x20 && c < 0x7F) || n > 0) {
      line.append(text, i, std::max<size_t>(n, 1));
      i += std::max<size_t>(n, 1);
    } else {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02X", c);
      line += hex;
      ++i;
    }
  }
  return line;
}

void print_error(const std::string& who, const std::string& text) {
  std::fprintf(stderr, "%s: error: %s\n", who.c_str(), printable(text).c_str());
}

}  // namespace moert_cli

#include "cli/error.h"

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

std::string printable(const std::string& text) {
  std::string line;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c != 0x7F) {
      line += ch;
    } else {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02X", c);
      line += hex;
    }
  }
  return line;
}

void print_error(const std::string& who, const std::string& text) {
  std::fprintf(stderr, "%s: error: %s\n", who.c_str(), printable(text).c_str());
}

}  // namespace moert_cli

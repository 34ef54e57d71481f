// open_confined (LoadOptions::confine_external_data) in both of its ways: openat2's
// RESOLVE_BENEATH, which the kernels of this project's machines have, and the check by
// /proc/self/fd that a kernel or sandbox without openat2 gets, which no test machine would run
// otherwise. The C ABI tests (capi.ExternalData, capi.LoadLimits) load models through it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/model_loader.h"

namespace moert {
namespace {

namespace fs = std::filesystem;

// Whether this kernel (and sandbox) lets a process call openat2.
bool openat2_available() {
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC;
  const long fd = ::syscall(SYS_openat2, AT_FDCWD, "/", &how, sizeof how);
  if (fd >= 0) ::close(static_cast<int>(fd));
  return fd >= 0;
}

class ConfinedOpen : public testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam() && !openat2_available())
      GTEST_SKIP() << "this kernel or sandbox has no openat2: loads take the other way, which "
                      "the ProcSelfFd cases cover";
    char pattern[] = "/tmp/moert_confined_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    base_ = pattern;
    fs::create_directories(base_ / "m" / "sub");
    fs::create_directories(base_ / "outside");
    std::ofstream(base_ / "m" / "w.data") << "inside!";
    std::ofstream(base_ / "outside" / "secret.data") << "secret";
  }
  void TearDown() override {
    if (!base_.empty()) fs::remove_all(base_);
  }

  // The bytes of the file opened, or the error's code and message.
  std::string open(const std::string& rel, Code* code = nullptr) {
    try {
      uint64_t size = 0;
      const int fd = open_confined((base_ / "m").string(), rel, &size, GetParam());
      std::string bytes(size, '\0');
      const ssize_t n = ::pread(fd, bytes.data(), bytes.size(), 0);
      ::close(fd);
      EXPECT_EQ(n, static_cast<ssize_t>(size));
      return bytes;
    } catch (const Error& e) {
      if (code) *code = e.code();
      return e.message();
    }
  }

  fs::path base_;
};

TEST_P(ConfinedOpen, FilesAndRelativeLinksInsideOpen) {
  EXPECT_EQ(open("w.data"), "inside!");
  EXPECT_EQ(open("./w.data"), "inside!");
  fs::create_symlink("w.data", base_ / "m" / "link.data");
  EXPECT_EQ(open("link.data"), "inside!");
  fs::create_symlink("../w.data", base_ / "m" / "sub" / "up.data");
  EXPECT_EQ(open("sub/up.data"), "inside!");
  fs::create_directory_symlink("sub", base_ / "m" / "via");
  EXPECT_EQ(open("via/up.data"), "inside!");
}

TEST_P(ConfinedOpen, ALinkOutIsRefusedNamingWhereItLeads) {
  fs::create_symlink("../outside/secret.data", base_ / "m" / "rel.data");
  fs::create_symlink(base_ / "outside" / "secret.data", base_ / "m" / "abs.data");
  fs::create_directory_symlink("../outside", base_ / "m" / "dir");
  for (const char* rel : {"rel.data", "abs.data", "dir/secret.data"}) {
    Code code = Code::Internal;
    const std::string message = open(rel, &code);
    EXPECT_EQ(code, Code::InvalidModel) << rel << ": " << message;
    EXPECT_NE(message.find("outside/secret.data"), std::string::npos) << message;
    EXPECT_NE(message.find("outside the model's directory"), std::string::npos) << message;
    EXPECT_NE(message.find("confine_external_data"), std::string::npos) << message;
  }
}

TEST_P(ConfinedOpen, WhatIsNotARegularFileIsIo) {
  Code code = Code::Internal;
  EXPECT_NE(open(".", &code).find("not a regular file"), std::string::npos);
  EXPECT_EQ(code, Code::Io);
  code = Code::Internal;
  EXPECT_NE(open("missing.data", &code).find("missing.data"), std::string::npos);
  EXPECT_EQ(code, Code::Io);
  fs::create_symlink("loop.data", base_ / "m" / "loop.data");
  code = Code::Internal;
  open("loop.data", &code);
  EXPECT_EQ(code, Code::Io);
}

// Only openat2 sees the way a path takes: an absolute link, even to a file inside, is refused
// there; the check by /proc/self/fd sees only where the file lies.
TEST_P(ConfinedOpen, AnAbsoluteLinkToAFileInside) {
  fs::create_symlink(base_ / "m" / "w.data", base_ / "m" / "abs_inside.data");
  Code code = Code::Internal;
  const std::string got = open("abs_inside.data", &code);
  if (GetParam()) {
    EXPECT_EQ(code, Code::InvalidModel) << got;
    EXPECT_NE(got.find("reached by a way out of it"), std::string::npos) << got;
  } else {
    EXPECT_EQ(got, "inside!");
  }
}

TEST_P(ConfinedOpen, AFifoIsRefusedWithoutWaitingForAWriter) {
  ASSERT_EQ(::mkfifo((base_ / "m" / "f.data").c_str(), 0600), 0);
  Code code = Code::Internal;
  EXPECT_NE(open("f.data", &code).find("not a regular file"), std::string::npos);
  EXPECT_EQ(code, Code::Io);
}

// With "/" as the directory every file lies inside: an absolute link is followed there too.
TEST_P(ConfinedOpen, EverythingLiesInsideTheRootDirectory) {
  fs::create_symlink(base_ / "m" / "w.data", base_ / "m" / "abs_inside.data");
  uint64_t size = 0;
  const std::string rel = (base_ / "m" / "abs_inside.data").relative_path().string();
  const int fd = open_confined("/", rel, &size, GetParam());
  ::close(fd);
  EXPECT_EQ(size, 7u);
}

INSTANTIATE_TEST_SUITE_P(Ways, ConfinedOpen, testing::Bool(),
                         [](const testing::TestParamInfo<bool>& p) {
                           return p.param ? std::string("Openat2") : std::string("ProcSelfFd");
                         });

}  // namespace
}  // namespace moert

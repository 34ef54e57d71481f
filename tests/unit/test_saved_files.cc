// The clean-up that saves and imports share (schemas/saved_files.h): a data file of an earlier
// save goes only when no file in the directory names it, and whatever the scan cannot read for
// certain keeps it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/model.h"
#include "core/model_loader.h"
#include "core/model_writer.h"
#include "schemas/saved_files.h"

namespace moert {
namespace {

namespace fs = std::filesystem;

class SavedFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("moert-saved-files-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    // A model whose expert weights reach 64 KiB, so that it has a data file, saved twice with
    // different weights: the first save's data file is the stale candidate.
    model_ = load_model_file(MOERT_EXAMPLE_MODEL);
    write_model(path(), *model_);
    old_data_ = data_file();
    ASSERT_FALSE(old_data_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path() const { return (dir_ / "m.moert").string(); }

  // The data file the description at path() names.
  std::string data_file() const {
    std::ifstream in(path(), std::ios::binary);
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
    return format::external_data_of(bytes);
  }

  // Saves changed weights to path(): the clean-up considers old_data_.
  void save_again() {
    Model changed = *model_;
    for (auto& l : changed.layers)
      visit_tensors(l, [](const char*, Tensor& t) {
        for (float& v : t.values) v *= 0.5f;
      });
    write_model(path(), changed);
    ASSERT_NE(data_file(), old_data_);
  }

  bool old_data_kept() const { return fs::exists(dir_ / old_data_); }

  fs::path dir_;
  std::shared_ptr<const Model> model_;
  std::string old_data_;
};

TEST_F(SavedFiles, TheDataFileOfADescriptionNoOneNamesGoes) {
  save_again();
  EXPECT_FALSE(old_data_kept());
}

TEST_F(SavedFiles, DataFileNamesFollowTheSavesPattern) {
  EXPECT_TRUE(format::is_data_file_of("m.moert.0123456789abcdef.data", "m.moert"));
  EXPECT_FALSE(format::is_data_file_of("m.moert.0123456789ABCDEF.data", "m.moert"));
  EXPECT_FALSE(format::is_data_file_of("m.moert.0123456789abcde.data", "m.moert"));
  EXPECT_FALSE(format::is_data_file_of("n.moert.0123456789abcdef.data", "m.moert"));
  EXPECT_FALSE(format::is_data_file_of("m.moert-0123456789abcdef.data", "m.moert"));
  EXPECT_TRUE(format::is_save_temporary_of(".m.moert.tmp-a1B2c3", "m.moert"));
  EXPECT_TRUE(format::is_save_temporary_of(".m.moert.data-a1B2c3", "m.moert"));
  EXPECT_FALSE(format::is_save_temporary_of(".m.moert.tmp-a1B2c", "m.moert"));
}

// A JSON description (moert convert writes them) names the data file in its external_data, in
// any spelling JSON allows: escapes (convert writes non-ASCII as \uXXXX), a byte order mark,
// blanks and comments before the object.
TEST_F(SavedFiles, AJsonDescriptionNamingItInAnySpellingKeepsIt) {
  std::string escaped;
  for (char c : old_data_) escaped += c == '.' ? std::string("\\u002e") : std::string(1, c);
  for (const std::string& text :
       {"{ \"external_data\": \"" + old_data_ + "\" }\n",
        "\xEF\xBB\xBF  // a model\n/* kept */ {\"name\": \"x\", \"external_data\": \"" + escaped +
            "\"}",
        "// the \"best checkpoint\n{'external_data': /* was 'x' */ '" + old_data_ + "'}",
        "//" + std::string(5000, ' ') + "\n{\"external_data\": \"" + old_data_ + "\"}"}) {
    SCOPED_TRACE(text);
    SetUp();
    std::ofstream(dir_ / "m.json") << text;
    save_again();
    EXPECT_TRUE(old_data_kept());
  }
}

// The digest's own digits may be escaped too (\uXXXX, and FlatBuffers' \xHH), and an escape may
// straddle two 64 KiB reads.
TEST_F(SavedFiles, AJsonDescriptionSpellingTheDigestWithEscapesKeepsIt) {
  std::string all_escaped;
  for (size_t i = 0; i < old_data_.size(); ++i) {
    char code[8];
    std::snprintf(code, sizeof code, i % 2 ? "\\x%02x" : "\\u%04X",
                  static_cast<unsigned>(old_data_[i]));
    all_escaped += code;
  }
  const std::string prefix = "{\"external_data\": \"";
  for (size_t pad = 0; pad <= 6; ++pad) {
    // The first escape's backslash `pad` bytes before the end of the first read.
    const std::string text = "//" + std::string((64 << 10) - 3 - prefix.size() - pad, ' ') + "\n" +
                             prefix + all_escaped + "\"}";
    SCOPED_TRACE(pad);
    SetUp();
    std::ofstream(dir_ / "m.json") << text;
    save_again();
    EXPECT_TRUE(old_data_kept());
  }
}

TEST(JsonEscapes, AsciiEscapesAreDecodedAndAnEscapedBackslashIsNot) {
  std::string text;
  EXPECT_EQ(format::decode_json_ascii_escapes("a\\u0031\\\\u0032\\u00e9", true, text), 20u);
  EXPECT_EQ(text, "a1\\\\u0032\\u00e9");
  text.clear();
  // An escape cut by the end of a read waits for the rest.
  EXPECT_EQ(format::decode_json_ascii_escapes("ab\\u00", false, text), 2u);
  EXPECT_EQ(text, "ab");
  text.clear();
  EXPECT_EQ(format::decode_json_ascii_escapes("\\u003", true, text), 5u);
  EXPECT_EQ(text, "\\u003");
  text.clear();
  // FlatBuffers' parser, which reads JSON descriptions, also takes \xHH.
  EXPECT_EQ(format::decode_json_ascii_escapes("\\x30\\x3\\x61", true, text), 11u);
  EXPECT_EQ(text, "0\\x3a");
}

TEST_F(SavedFiles, JsonIsKnownPastMarksBlanksAndComments) {
  EXPECT_TRUE(format::may_be_json("\xEF\xBB\xBF // c\n /* d */ {", false));
  EXPECT_FALSE(format::may_be_json("step,loss\n", false));
  // A head that ends inside a comment, or at a '/', does not say: yes if the file goes on.
  EXPECT_TRUE(format::may_be_json("// a long comment", true));
  EXPECT_FALSE(format::may_be_json("// a long comment", false));
  EXPECT_TRUE(format::may_be_json("  /", true));
  EXPECT_TRUE(format::is_any_data_file("x.moert.0123456789abcdef.data"));
  EXPECT_TRUE(format::is_any_data_file(".x.moert.data-a1B2c3"));
  EXPECT_TRUE(format::is_any_data_file("x.moert.data.tmp.host.123"));
  EXPECT_FALSE(format::is_any_data_file("x.moert"));
}

// A copy being written (cp writes in pieces) does not verify yet: recently modified, it keeps
// every data file; long unmodified, it is damaged and names nothing.
TEST_F(SavedFiles, AFileJustCreatedKeepsThemAsACopyThatHasNotBegun) {
  std::ofstream(dir_ / "best.moert").close();
  save_again();
  EXPECT_TRUE(old_data_kept());
  fs::remove(dir_ / "best.moert");
  format::remove_unnamed_data_files(dir_, "m.moert", data_file());
  EXPECT_FALSE(old_data_kept());
}

TEST_F(SavedFiles, ADescriptionThatDoesNotVerifyKeepsThemWhileItMayBeACopyInProgress) {
  std::ifstream in(path(), std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  bytes.resize(16);  // the root offset and the identifier: the rest is still to come
  std::ofstream(dir_ / "copy.moert", std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  save_again();
  EXPECT_TRUE(old_data_kept());
  fs::last_write_time(dir_ / "copy.moert",
                      fs::file_time_type::clock::now() - std::chrono::hours(1));
  format::remove_unnamed_data_files(dir_, "m.moert", data_file());
  EXPECT_FALSE(old_data_kept());
}

// A description that reaches the data file through a link of another name keeps it.
TEST_F(SavedFiles, ADescriptionNamingALinkToTheDataFileKeepsIt) {
  Model renamed = *model_;
  write_model((dir_ / "alias.moert").string(), renamed);
  // alias.moert's own data file has the same content: make it a link to m.moert's instead.
  std::string alias_data;
  for (const auto& e : fs::directory_iterator(dir_))
    if (e.path().filename().string().starts_with("alias.moert.")) alias_data = e.path().string();
  ASSERT_FALSE(alias_data.empty());
  fs::remove(alias_data);
  fs::create_symlink(old_data_, alias_data);
  save_again();
  EXPECT_TRUE(old_data_kept());
}

// The scan never opens a FIFO: a writer blocked opening it stays blocked (opening it for reading
// would release the writer, whose writes then die of SIGPIPE once the scan closes it).
TEST_F(SavedFiles, AFifoIsNotOpened) {
  const fs::path fifo = dir_ / "progress";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  std::atomic<bool> opened{false};
  std::thread writer([&] {
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_CLOEXEC);
    opened = true;
    if (fd >= 0) ::close(fd);
  });
  save_again();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(opened.load());
  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);  // releases it
  writer.join();
  if (reader >= 0) ::close(reader);
  EXPECT_FALSE(old_data_kept());
}

// What the scan cannot read keeps every data file: a file that begins like a description but is
// larger than the scan reads (sparse here), and a process out of file descriptors.
TEST_F(SavedFiles, ADescriptionOfAnySizeIsReadAndWhatCannotBeReadKeepsThem) {
  // A description of any size costs a few small reads: a copy of m.moert's made sparse-large
  // (past 256 MiB, where an earlier version gave up and kept everything) names the old data.
  fs::copy_file(path(), dir_ / "big.moert");
  fs::resize_file(dir_ / "big.moert", int64_t{1} << 30);
  save_again();
  EXPECT_TRUE(old_data_kept());
  fs::remove(dir_ / "big.moert");

  // One descriptor number free below the soft limit: the listing gets it and gives it back, the
  // directory is opened with it, and no file can be opened to read what it names. (The soft
  // limit only, restored after.)
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  int highest = 0;
  for (int fd = 0; fd < 65536; ++fd)
    if (::fcntl(fd, F_GETFD) != -1) highest = fd;
  std::vector<int> fillers;
  for (int fd = ::dup(0); fd >= 0; fd = ::dup(0)) {
    if (fd > highest) {
      ::close(fd);
      break;
    }
    fillers.push_back(fd);
  }
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(highest + 2);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &tight), 0);
  format::remove_unnamed_data_files(dir_, "m.moert", "");
  ::setrlimit(RLIMIT_NOFILE, &saved);
  for (int fd : fillers) ::close(fd);
  EXPECT_TRUE(old_data_kept())
      << "a data file was removed although the scan could not open the directory's files";
  // With descriptors to spare, the same call removes it.
  format::remove_unnamed_data_files(dir_, "m.moert", "");
  EXPECT_FALSE(old_data_kept());
}

// A process stopped or stuck while it holds a directory's lock does not hang the next saver: its
// wait ends after the patience, and it can tell (the lock is then not held).
TEST_F(SavedFiles, ALockHeldElsewhereIsWaitedForABoundedTime) {
  const int fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);  // another open file description: as another process
  const auto t0 = std::chrono::steady_clock::now();
  {
    const format::DirectoryLock lock(dir_, std::chrono::milliseconds(200));
    EXPECT_TRUE(lock.timed_out());
  }
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(waited, 0.2);
  EXPECT_LT(waited, 5.0);
  ::flock(fd, LOCK_UN);
  const format::DirectoryLock lock(dir_, std::chrono::milliseconds(200));
  EXPECT_FALSE(lock.timed_out());
  ::close(fd);
}

// A test's saver process exits 0 once it has forked a child that writes its pid into `pipe_fds`
// and lives on holding what it was forked with: returns that child's pid (-1, reported, if none).
pid_t wait_for_saver(pid_t saver, int pipe_fds[2]) {
  ::close(pipe_fds[1]);
  pid_t child = -1;
  const bool received = ::read(pipe_fds[0], &child, sizeof child) == sizeof child;
  ::close(pipe_fds[0]);
  int status = 0;
  EXPECT_EQ(::waitpid(saver, &status, 0), saver);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the saver's status: " << status;
  if (!received || child <= 0) {
    ADD_FAILURE() << "the saver's child did not report";
    return -1;
  }
  EXPECT_EQ(::kill(child, 0), 0) << "the forked child should still be alive";
  return child;
}

// A child forked without exec while a save holds its locks does not share them: once the saver
// has died, the directory and its temporary file are free although the child lives on (before,
// every later save there waited out its patience and failed, and the file was never cleaned up).
TEST_F(SavedFiles, AChildForkedWhileLocksAreHeldDoesNotKeepThem) {
  const fs::path temporary = dir_ / ".m.moert.data-aB3dE5";
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t saver = ::fork();
  ASSERT_GE(saver, 0);
  if (saver == 0) {
    const format::DirectoryLock lock(dir_);
    const format::ForkClosedFd file(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (lock.timed_out() || file.fd() < 0 || ::flock(file.fd(), LOCK_EX) != 0) ::_exit(2);
    const pid_t child = ::fork();
    if (child == 0) {
      // Told from here, once fork() has returned in the child: its fork handlers have run by
      // then. Told by the saver, the test could look before the child had run at all, while it
      // still held every descriptor the kernel copied.
      const pid_t me = ::getpid();
      if (::write(pipe_fds[1], &me, sizeof me) != sizeof me) ::_exit(3);
      ::sleep(60);  // holds whatever it kept; killed below
      ::_exit(0);
    }
    ::_exit(child > 0 ? 0 : 3);  // dies holding both locks: no destructor runs
  }
  const pid_t child = wait_for_saver(saver, pipe_fds);
  ASSERT_GT(child, 0);
  {
    const format::DirectoryLock lock(dir_, std::chrono::milliseconds(2000));
    EXPECT_FALSE(lock.timed_out()) << "the forked child kept the directory locked";
  }
  EXPECT_FALSE(format::held_by_a_writer(temporary))
      << "the forked child kept the temporary file locked";
  ::kill(child, SIGKILL);
}

// An open that blocks (a stuck file system; here a FIFO that has no writer yet) does not hold up
// fork() elsewhere in the process: before, the fork handler waited for the mutex that the open was
// made under. The descriptor is still registered, from an open made after the fork.
TEST_F(SavedFiles, AForkDoesNotWaitForAnOpenThatBlocks) {
  const fs::path fifo = dir_ / "slow-file-system";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  std::atomic<pid_t> opener_tid{0};
  std::atomic<bool> opened{false};
  bool registered = false;
  std::thread opener([&] {
    opener_tid = static_cast<pid_t>(::gettid());
    const format::ForkClosedFd file(fifo.c_str(), O_RDONLY);
    registered = file.fd() >= 0 && file.open_here();
    opened = true;
  });
  // The opener asleep in the kernel: inside its open, the only call of its that blocks.
  const auto asleep = [&] {
    std::ifstream stat("/proc/self/task/" + std::to_string(opener_tid.load()) + "/stat");
    std::string line;
    std::getline(stat, line);
    const auto close_paren = line.rfind(')');
    return close_paren != std::string::npos && close_paren + 2 < line.size() &&
           line[close_paren + 2] == 'S';
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while ((opener_tid == 0 || !asleep()) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  // Gives the open its writer after the fork, or after 20 s if the fork waits for it (which then
  // fails the test instead of hanging it). The writer stays until the opener is done: it opens
  // the FIFO a second time.
  std::atomic<bool> forked{false};
  std::thread writer([&] {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!forked && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_CLOEXEC);
    while (!opened) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (fd >= 0) ::close(fd);
  });
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  forked = true;
  ASSERT_GT(child, 0);
  int status = 0;
  EXPECT_EQ(::waitpid(child, &status, 0), child);
  writer.join();
  opener.join();
  EXPECT_LT(took, 10.0) << "fork() waited for an open under way in another thread";
  EXPECT_TRUE(registered) << "the descriptor opened across a fork was not registered";
}

// What the hook below makes of the window between a ForkClosedFd's first open and its check for
// forks (a fork() from another thread, a path changed by another process), in the forms the
// hook's plain function pointer allows.
int g_report_fd = -1;     // where a forked child writes its pid, when set
pid_t g_forked = -1;      // the child forked in the window
fs::path g_replace_from;  // renamed over g_replace_to in the window, when set
fs::path g_replace_to;
void fork_in_the_window() {
  g_forked = ::fork();
  if (g_forked == 0) {
    if (g_report_fd < 0) ::_exit(0);
    const pid_t me = ::getpid();
    if (::write(g_report_fd, &me, sizeof me) != sizeof me) ::_exit(3);
    ::sleep(60);  // keeps every descriptor it was forked with; killed by the test
    ::_exit(0);
  }
  if (!g_replace_from.empty()) ::rename(g_replace_from.c_str(), g_replace_to.c_str());
}
struct WindowHook {
  WindowHook() { format::fork_closed::after_first_open = &fork_in_the_window; }
  ~WindowHook() {
    format::fork_closed::after_first_open = nullptr;
    if (g_forked > 0 && g_report_fd < 0) ::waitpid(g_forked, nullptr, 0);
    g_forked = -1;
    g_replace_from.clear();
  }
};

// A temporary file created just before a fork() is made again, so that the saver's lock is not
// shared with that child, which lives on after the saver dies. The saver runs as an unprivileged
// user under umask 0222: opening the file again by path would be refused the write access its
// creation granted (79 saves in 300 failed so before this was made a second creation).
TEST_F(SavedFiles, AFileCreatedAcrossAForkIsMadeAgainAndItsLockIsNotTheChilds) {
  const fs::path temporary = dir_ / ".m.moert.data-fK4a9Q";
  fs::permissions(dir_, fs::perms::all);  // 0777: the unprivileged saver creates files here
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t saver = ::fork();
  ASSERT_GE(saver, 0);
  if (saver == 0) {
    if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) ::_exit(4);
    ::umask(0222);
    g_report_fd = pipe_fds[1];
    const WindowHook hook;
    const format::ForkClosedFd file(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (file.fd() < 0) ::_exit(2);
    if (::flock(file.fd(), LOCK_EX) != 0 || ::write(file.fd(), "x", 1) != 1) ::_exit(3);
    ::_exit(0);  // dies holding the lock: no destructor runs
  }
  const pid_t child = wait_for_saver(saver, pipe_fds);
  ASSERT_GT(child, 0);
  EXPECT_EQ(fs::file_size(temporary), 1u);
  EXPECT_FALSE(format::held_by_a_writer(temporary))
      << "the child forked between the creation and its check kept the temporary file locked";
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
}

// A path that names another file by the time of the second open is refused, not taken for the
// file first opened (a directory lock would lock the wrong directory).
TEST_F(SavedFiles, APathReplacedAcrossAForkIsRefused) {
  const fs::path first = dir_ / "first", other = dir_ / "other";
  std::ofstream(first) << "first";
  std::ofstream(other) << "other";
  g_replace_from = other;
  g_replace_to = first;
  errno = 0;
  int fd = 0, error = 0;
  {
    const WindowHook hook;
    const format::ForkClosedFd file(first.c_str(), O_RDONLY);
    fd = file.fd();
    error = errno;
  }
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(error, ESTALE) << std::strerror(error);
}

// A created file whose path became a symbolic link across a fork is not written through the link:
// the second creation is exclusive too, and fails.
TEST_F(SavedFiles, ACreatedFileReplacedByALinkAcrossAForkIsNotFollowed) {
  const fs::path temporary = dir_ / ".m.moert.data-Zz01Yy", victim = dir_ / "victim",
                 link = dir_ / "link";
  std::ofstream(victim) << "untouched";
  fs::create_symlink(victim, link);
  g_replace_from = link;
  g_replace_to = temporary;
  int fd = 0, error = 0;
  {
    const WindowHook hook;
    const format::ForkClosedFd file(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_TRUNC, 0644);
    fd = file.fd();
    error = errno;
  }
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(error, EEXIST) << std::strerror(error);
  std::string content;
  std::ifstream(victim) >> content;
  EXPECT_EQ(content, "untouched");
  EXPECT_TRUE(fs::is_symlink(temporary));
}

// A model loaded from a path that saves keep replacing (a server reloading the checkpoint a
// trainer writes) loads whole every time: when the description it read was replaced and its data
// file removed before it opened that file, the load reads the new one instead of failing.
TEST_F(SavedFiles, ALoadDuringSavesToItsPathLoadsOneOfThem) {
  Model changed = *model_;
  for (auto& l : changed.layers)
    visit_tensors(l, [](const char*, Tensor& t) {
      for (float& v : t.values) v *= 0.5f;
    });
  std::atomic<bool> done{false};
  std::thread saver([&] {
    for (int i = 0; i < 300; ++i) write_model(path(), i % 2 ? *model_ : changed);
    done = true;
  });
  std::atomic<int> loads{0};
  std::mutex mu;
  std::vector<std::string> failures;
  auto load = [&] {
    while (!done) {
      try {
        load_model_file(path());
        ++loads;
      } catch (const Error& e) {
        std::lock_guard<std::mutex> lock(mu);
        failures.push_back(e.what());
      }
    }
  };
  std::thread other(load);
  load();
  saver.join();
  other.join();
  EXPECT_TRUE(failures.empty()) << failures.size() << " of " << loads + failures.size()
                                << " loads failed, the first: " << failures.front();
  EXPECT_GT(loads, 0);
}

// A save's temporary data file stays while its writer holds it (a save into the same path in
// another process, writing outside the directory lock); one nobody holds is a killed save's
// leftover and goes.
TEST_F(SavedFiles, TheCleanUpLeavesATemporaryFileItsWriterHolds) {
  const fs::path held = dir_ / ".m.moert.data-aB3dE5", left = dir_ / ".m.moert.data-Zz9yY8";
  const int fd = ::open(held.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  std::ofstream(left) << "leftover";
  EXPECT_TRUE(format::held_by_a_writer(held));
  EXPECT_FALSE(format::held_by_a_writer(left));
  save_again();
  EXPECT_TRUE(fs::exists(held));
  EXPECT_FALSE(fs::exists(left));
  ::close(fd);
  save_again();
  EXPECT_FALSE(fs::exists(held));
}

// A save past the process's file size limit (`ulimit -f`) fails with an error naming the file,
// instead of SIGXFSZ ending the host process; the checkpoint already at the path stays whole and
// nothing is left beside it. In a child, whose limit and fate are its own.
TEST_F(SavedFiles, AFileSizeLimitFailsTheSaveAndLeavesTheOldFile) {
  const auto before = fs::file_size(path());
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const rlimit small{16384, 16384};
    if (::setrlimit(RLIMIT_FSIZE, &small) != 0) ::_exit(10);
    try {
      Model changed = *model_;
      for (auto& l : changed.layers)
        visit_tensors(l, [](const char*, Tensor& t) {
          for (float& v : t.values) v *= 0.5f;
        });
      write_model(path(), changed);
      ::_exit(11);  // written past the limit?
    } catch (const Error& e) {
      const std::string m = e.what();
      ::_exit(e.code() == Code::Io && m.find("File too large") != std::string::npos &&
                      m.find(path()) != std::string::npos
                  ? 0
                  : 12);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "the child ended by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(fs::file_size(path()), before);
  EXPECT_EQ(data_file(), old_data_);
  EXPECT_NO_THROW(load_model_file(path()));
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) files += e.is_regular_file();
  EXPECT_EQ(files, 2u);  // the description and its data file
}

}  // namespace
}  // namespace moert

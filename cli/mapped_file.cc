#include "cli/mapped_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "cli/error.h"

namespace moert_cli {

namespace {

// The mapped inputs, as the SIGBUS handler reads them: a list that only grows (entries are
// reused, never freed), so that the handler walks it without a lock. An entry whose begin is 0
// is free.
struct Region {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<bool> faulted{false};
  Region* next = nullptr;  // fixed before the entry is published
};
static_assert(std::atomic<uintptr_t>::is_always_lock_free && std::atomic<bool>::is_always_lock_free,
              "the SIGBUS handler reads these atomics");

std::atomic<Region*> g_regions{nullptr};
std::atomic<uintptr_t> g_page{4096};
std::mutex g_mutex;  // registration and the handler's installation
int g_mapped = 0;    // MappedFiles alive: the handler is installed while there are any
struct sigaction g_previous {};

void on_sigbus(int sig, siginfo_t* info, void*) {
  // A fault (si_code > 0) inside a mapped input: the pages from the faulting one to the end of the
  // mapping are past the file's new end, so they all become zero pages at once (one fault per
  // file, however much of it is read after), and the read that faulted is retried on them.
  // mmap is a plain system call on Linux, safe here though POSIX does not list it.
  if (info->si_code > 0) {
    const auto at = reinterpret_cast<uintptr_t>(info->si_addr);
    for (Region* r = g_regions.load(std::memory_order_acquire); r; r = r->next) {
      const uintptr_t begin = r->begin.load(std::memory_order_acquire);
      const uintptr_t end = r->end.load(std::memory_order_acquire);
      if (begin == 0 || at < begin || at >= end) continue;
      const uintptr_t page = at & ~(g_page.load(std::memory_order_relaxed) - 1);
      if (mmap(reinterpret_cast<void*>(page), end - page, PROT_READ,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
        r->faulted.store(true, std::memory_order_release);
        return;
      }
      break;
    }
  }
  // Any other SIGBUS is the previous disposition's: restored, it takes the fault when the
  // instruction runs again (by default ending the process with SIGBUS, as without this handler),
  // or the signal, raised again, once this handler returns (SIGBUS is blocked until then).
  sigaction(SIGBUS, &g_previous, nullptr);
  if (info->si_code <= 0) raise(sig);
}

Region* register_region(uintptr_t begin, uintptr_t end) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  Region* r = g_regions.load(std::memory_order_acquire);
  while (r && r->begin.load(std::memory_order_relaxed) != 0) r = r->next;
  if (!r) {
    r = new Region;  // kept for the life of the process: the handler may be reading the list
    r->next = g_regions.load(std::memory_order_relaxed);
    g_regions.store(r, std::memory_order_release);
  }
  r->faulted.store(false, std::memory_order_relaxed);
  r->end.store(end, std::memory_order_release);
  r->begin.store(begin, std::memory_order_release);
  return r;
}

void unregister_region(Region* r) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  r->begin.store(0, std::memory_order_release);
}

// The handler is installed by the first MappedFile and the previous disposition restored by the
// last, so that the command handles SIGBUS only while it reads mapped inputs.
void hold_handler() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  if (g_mapped++ > 0) return;
  g_page.store(static_cast<uintptr_t>(sysconf(_SC_PAGESIZE)), std::memory_order_relaxed);
  struct sigaction action {};
  action.sa_sigaction = on_sigbus;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &g_previous);
}

void release_handler() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  if (--g_mapped == 0) sigaction(SIGBUS, &g_previous, nullptr);
}

}  // namespace

MappedFile::MappedFile(const std::string& path, const std::string& kind) : path_(path) {
  // Not blocking: a FIFO is refused below instead of hanging the open.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) fail("cannot open ", kind, "'", path, "': ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    fail("'", path, "' is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  mtime_ = st.st_mtim;
  if (size_ == 0) return;  // nothing to map (mmap refuses a length of 0)
  hold_handler();
  map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
  if (map_ == MAP_FAILED) {
    const int err = errno;
    map_ = nullptr;
    release_handler();
    ::close(fd_);
    fail("cannot map '", path, "': ", std::strerror(err));
  }
  const uintptr_t page = g_page.load(std::memory_order_relaxed);
  const auto begin = reinterpret_cast<uintptr_t>(map_);
  region_ = register_region(begin, begin + (size_ + page - 1) / page * page);
}

MappedFile::~MappedFile() {
  if (map_) {
    unregister_region(static_cast<Region*>(region_));
    munmap(map_, size_);
    release_handler();
  }
  ::close(fd_);
}

void MappedFile::check_unchanged() const {
  struct stat st {};
  const bool faulted =
      region_ && static_cast<const Region*>(region_)->faulted.load(std::memory_order_acquire);
  if (fstat(fd_, &st) != 0) fail("'", path_, "': cannot stat: ", std::strerror(errno));
  const auto now = static_cast<size_t>(st.st_size);
  if (!faulted && now == size_ && st.st_mtim.tv_sec == mtime_.tv_sec &&
      st.st_mtim.tv_nsec == mtime_.tv_nsec)
    return;
  fail("'", path_, "' changed while being read (",
       now != size_ ? cat(size_, " bytes when opened, ", now, " now")
       : faulted    ? cat("cut short and grown back to ", size_, " bytes")
                    : std::string("modified since it was opened"),
       "): run again once nothing writes to it");
}

void MappedFile::check_still_named() const {
  struct stat st {
  }, named{};
  if (fstat(fd_, &st) != 0) fail("'", path_, "': cannot stat: ", std::strerror(errno));
  // One removed since was read whole all the same.
  if (::stat(path_.c_str(), &named) == 0 &&
      (named.st_dev != st.st_dev || named.st_ino != st.st_ino))
    fail("'", path_,
         "' was replaced while being read (an export into its folder?): run again once nothing "
         "writes there");
}

}  // namespace moert_cli

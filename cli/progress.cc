#include "cli/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "cli/error.h"

namespace moert_cli {

std::string clock_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<uint64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%llu:%02llu:%02llu", static_cast<unsigned long long>(s / 3600),
                  static_cast<unsigned long long>(s / 60 % 60),
                  static_cast<unsigned long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%llu:%02llu", static_cast<unsigned long long>(s / 60),
                  static_cast<unsigned long long>(s % 60));
  return buf;
}

Progress::Progress(std::string label, uint64_t total, uint64_t every, std::string unit)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(std::max<uint64_t>(total, 1)),
      every_(every ? every : std::max<uint64_t>(total / 10, 1)),
      next_line_(every_),
      tty_(isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

Progress::~Progress() {
  if (open_) std::fputc('\n', stderr);
}

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

// ", figures", or nothing when there are none.
static std::string with_sep(const std::string& figures) {
  return figures.empty() ? "" : ", " + figures;
}

std::string Progress::rate_and_eta(uint64_t done) const {
  const double t = elapsed_seconds();
  const double rate = t > 0 ? static_cast<double>(done) / t : 0.0;
  const double eta = rate > 0 ? static_cast<double>(total_ - std::min(done, total_)) / rate : -1;
  char buf[96];
  std::snprintf(buf, sizeof buf, "%.1f %s/s, ETA %s", rate, unit_.c_str(), clock_text(eta).c_str());
  return buf;
}

namespace {
bool g_muted = false;
}  // namespace

void Progress::mute() { g_muted = true; }

void Progress::update(uint64_t done, const std::string& figures) {
  if (g_muted) return;
  if (!tty_) {
    // Work may advance by more than one unit per call (evaluation batches): a line is due each
    // time another `every` units are done. finish() reports the end.
    if (done < next_line_ || done >= total_) return;
    while (next_line_ <= done) next_line_ += every_;
    std::fprintf(stderr, "%s: %s %llu/%llu, %s%s\n", label_.c_str(), unit_.c_str(),
                 static_cast<unsigned long long>(done), static_cast<unsigned long long>(total_),
                 rate_and_eta(done).c_str(), with_sep(figures).c_str());
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  // A terminal redraw costs far more than a small training step; a few per second are enough.
  if (open_ && done != total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(kWidth * std::min(done, total_) / total_);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(kWidth - filled), '.');
  // \r returns to the line start and \x1b[K clears what a longer previous line left behind.
  std::fprintf(stderr, "\r\x1b[K%s [%s] %llu/%llu %3.0f%% %s  %s", label_.c_str(), bar.c_str(),
               static_cast<unsigned long long>(done), static_cast<unsigned long long>(total_),
               100.0 * static_cast<double>(done) / static_cast<double>(total_),
               rate_and_eta(done).c_str(), figures.c_str());
  std::fflush(stderr);
  open_ = true;
}

void Progress::finish(const std::string& figures) {
  if (g_muted) return;
  const double t = elapsed_seconds();
  if (tty_) {
    update(total_, figures);
    std::fputc('\n', stderr);
    open_ = false;
  } else {
    std::fprintf(stderr, "%s: %llu/%llu done in %s%s\n", label_.c_str(),
                 static_cast<unsigned long long>(total_), static_cast<unsigned long long>(total_),
                 clock_text(t).c_str(), with_sep(figures).c_str());
  }
}

}  // namespace moert_cli

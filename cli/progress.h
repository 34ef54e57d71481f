// Progress of long work on stderr: on a terminal, one bar redrawn in place with rate, ETA and the
// caller's live figures; otherwise (a log file, CI) a plain line every `every` steps.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moert_cli {

class Progress {
 public:
  // `every` = 0 picks about ten lines over the run when stderr is not a terminal; `unit` names
  // what is counted ("step", "row").
  Progress(std::string label, uint64_t total, uint64_t every, std::string unit = "step");
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Reports that `done` of `total` steps are complete; `figures` is appended ("loss 2.31 ...").
  void update(uint64_t done, const std::string& figures);
  // Ends the bar (a newline on a terminal); the destructor does it when not called.
  void finish(const std::string& figures);

  double elapsed_seconds() const;

  // Every Progress of the process prints nothing from now on (the other ranks of a job).
  static void mute();

 private:
  std::string rate_and_eta(uint64_t done) const;

  std::string label_, unit_;
  uint64_t total_, every_, next_line_;
  bool tty_;
  bool open_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// "1:05" or "1:02:05".
std::string clock_text(double seconds);

}  // namespace moert_cli

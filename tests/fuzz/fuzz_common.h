// What every libFuzzer harness of moert does with a model that loaded: run it, as a service would,
// and turn anything that is not a clean refusal into a crash the fuzzer records. A clean refusal
// is a moert::Error with a code other than Internal; anything else (Internal, another exception,
// a sanitizer report) is a bug.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/model.h"
#include "core/session.h"

namespace moert_fuzz {

// Widths beyond this are not run: a forward pass of two such rows is the caller's memory, not
// something the model file makes the library allocate.
inline constexpr uint32_t kMaxRunWidth = 1u << 16;

[[noreturn]] inline void finding(const char* what, const char* message) {
  std::fprintf(stderr, "moert fuzz finding: %s: %s\n", what, message);
  std::abort();
}

// Runs `f`; a clean refusal returns false, success true, anything else aborts.
template <typename F>
bool clean(const char* what, F&& f) {
  try {
    f();
    return true;
  } catch (const moert::Error& e) {
    if (e.code() == moert::Code::Internal) finding(what, e.what());
    return false;
  }
}

inline bool runnable(const moert::Model& m) {
  if (m.input_width > kMaxRunWidth) return false;
  for (const auto& l : m.layers)
    if (l.in_width > kMaxRunWidth || l.out_width > kMaxRunWidth) return false;
  return true;
}

// One forward pass of two rows (token id 0 is in every vocabulary; 1 may not be).
inline bool forward(moert::Session& s, const moert::Model& m) {
  constexpr uint64_t kRows = 2;
  std::vector<float> out(kRows * m.output_width);
  return clean("forward", [&] {
    if (m.token_input) {
      std::vector<int32_t> tokens(kRows * m.input_width, 0);
      for (size_t i = 1; i < tokens.size(); i += 2) tokens[i] = 1;
      s.forward_tokens(tokens.data(), tokens.size(), kRows, out.data(), out.size());
    } else {
      std::vector<float> in(kRows * m.input_width);
      for (size_t i = 0; i < in.size(); ++i) in[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
      s.forward_hidden(in.data(), in.size(), kRows, out.data(), out.size());
    }
  });
}

// A training step: forward, backward (from the loss when the model ends in a head, else from a
// constant output gradient), optimizer step, then a forward in eval mode.
inline void train_step(moert::Session& s, const moert::Model& m) {
  clean("zero_grad", [&] { s.zero_grad(); });
  if (!forward(s, m)) return;
  const bool head = m.layers.back().kind == moert::LayerKind::OutputHead;
  const bool backward_ok = clean("backward", [&] {
    if (head) {
      std::vector<int32_t> targets(2, 0);
      s.backward_loss(targets.data(), targets.size());
    } else {
      std::vector<float> dy(2 * m.output_width, 0.01f);
      s.backward(dy.data(), dy.size(), nullptr, 0);
    }
  });
  if (backward_ok) clean("step", [&] { s.step(); });
  clean("set_eval", [&] { s.set_eval(true); });
  forward(s, m);
}

inline void run_inference(std::shared_ptr<const moert::Model> model) {
  if (!runnable(*model)) return;
  moert::SessionOptions o;
  std::unique_ptr<moert::Session> s;
  if (!clean("session", [&] { s = std::make_unique<moert::Session>(model, o); })) return;
  forward(*s, *model);
}

inline void run_training(std::shared_ptr<const moert::Model> model) {
  if (!runnable(*model)) return;
  moert::SessionOptions o;
  o.mode = moert::Mode::Training;
  std::unique_ptr<moert::Session> s;
  if (!clean("session", [&] { s = std::make_unique<moert::Session>(model, o); })) return;
  train_step(*s, *model);
}

}  // namespace moert_fuzz

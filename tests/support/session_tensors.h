// Reads every trainable tensor of a training session through the C ABI, for tests that compare
// sessions or devices.
#pragma once

#include <moert/moert.h>

#include <string>
#include <utility>
#include <vector>

namespace moert_test {

enum class Read { Parameters, Gradients };

// (name, values) of every parameter or gradient, in the session's order.
inline std::vector<std::pair<std::string, std::vector<float>>> named_tensors(const moert_session* s,
                                                                             Read what) {
  std::vector<std::pair<std::string, std::vector<float>>> out;
  uint32_t n = 0;
  moert_status_free(moert_session_num_parameters(s, &n));
  for (uint32_t i = 0; i < n; ++i) {
    const char* name = nullptr;
    uint64_t numel = 0;
    moert_status_free(moert_session_parameter_info(s, i, &name, &numel));
    std::vector<float> v(numel);
    moert_status_free(what == Read::Parameters
                          ? moert_session_get_parameter(s, name, v.data(), numel)
                          : moert_session_get_gradient(s, name, v.data(), numel));
    out.emplace_back(name, std::move(v));
  }
  return out;
}

// Every parameter value, concatenated.
inline std::vector<float> all_parameters(const moert_session* s) {
  std::vector<float> all;
  for (auto& [name, v] : named_tensors(s, Read::Parameters))
    all.insert(all.end(), v.begin(), v.end());
  return all;
}

}  // namespace moert_test

#include "cli/precision_accuracy.h"

#include <cmath>

#include "cli/error.h"

namespace moert_cli {
namespace {

constexpr uint32_t kLayer = 0;  // the model's only layer

SessionPtr loaded_session(const moert_model* layer, SessionConfig config,
                          const LayerOperands& ops) {
  config.training = true;  // only a training session accepts parameters and a bias
  SessionPtr s = create_session(layer, config);
  for (const auto& [name, values] : ops.parameters)
    check(moert_session_set_parameter(s.get(), name.c_str(), values.data(), values.size()), name);
  if (!ops.expert_bias.empty())
    check(moert_session_set_expert_bias(s.get(), kLayer, ops.expert_bias.data(),
                                        ops.expert_bias.size()),
          "expert bias");
  return s;
}

struct Pass {
  std::vector<float> y, dx;
  std::vector<std::pair<std::string, std::vector<float>>> grads;
};

Pass run_pass(const moert_model* layer, const SessionConfig& config, const LayerOperands& ops) {
  SessionPtr s = loaded_session(layer, config, ops);
  Pass p{std::vector<float>(ops.x.size()), std::vector<float>(ops.x.size()), {}};
  check(moert_session_forward_hidden(s.get(), ops.x.data(), ops.x.size(), ops.rows, p.y.data(),
                                     p.y.size()),
        "forward");
  check(moert_session_backward(s.get(), ops.dy.data(), ops.dy.size(), p.dx.data(), p.dx.size(),
                               nullptr),
        "backward");
  uint32_t n = 0;
  check(moert_session_num_parameters(s.get(), &n), "parameters");
  for (const char* tensor : {"w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2"}) {
    const std::string name = cat("moe.", tensor);
    for (uint32_t i = 0; i < n; ++i) {
      const char* pn = nullptr;
      uint64_t numel = 0;
      check(moert_session_parameter_info(s.get(), i, &pn, &numel), "parameter");
      if (name != pn) continue;
      std::vector<float> g(numel);
      check(moert_session_get_gradient(s.get(), pn, g.data(), numel), "gradient");
      p.grads.emplace_back(tensor, std::move(g));
    }
  }
  // The layer is residual: y = x + experts(x), dx = dy + d experts / dx. The residual parts are
  // exact in every precision and would hide the GEMMs' error, so they are taken out.
  for (size_t i = 0; i < ops.x.size(); ++i) {
    p.y[i] -= ops.x[i];
    p.dx[i] -= ops.dy[i];
  }
  return p;
}

}  // namespace

double relative_distance(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = static_cast<double>(a[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

GemmAccuracy gemm_accuracy(const moert_model* layer, const SessionConfig& fp32,
                           const SessionConfig& low, const LayerOperands& ops) {
  const Pass a = run_pass(layer, fp32, ops), b = run_pass(layer, low, ops);
  GemmAccuracy acc;
  acc.fprop = relative_distance(b.y, a.y);
  acc.dgrad = relative_distance(b.dx, a.dx);
  for (size_t i = 0; i < a.grads.size() && i < b.grads.size(); ++i)
    acc.wgrad.emplace_back(a.grads[i].first,
                           relative_distance(b.grads[i].second, a.grads[i].second));
  return acc;
}

std::vector<float> layer_output(const moert_model* layer, const SessionConfig& config,
                                const LayerOperands& ops) {
  SessionPtr s = loaded_session(layer, config, ops);
  check(moert_session_set_eval(s.get(), 1), "eval mode");
  std::vector<float> y(ops.x.size());
  check(moert_session_forward_hidden(s.get(), ops.x.data(), ops.x.size(), ops.rows, y.data(),
                                     y.size()),
        "forward");
  return y;
}

}  // namespace moert_cli

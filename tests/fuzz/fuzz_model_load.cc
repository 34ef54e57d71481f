// libFuzzer harness: a model description from memory, loaded as a service would load a file it
// did not write (with load limits), then inspected and run: an inference forward pass and, for a
// small model, a training step.
#include <cstddef>
#include <cstdint>

#include "core/model_loader.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moert::LoadOptions limits;
  // Small limits keep each execution short; what they refuse is the limit check's coverage.
  limits.max_memory = uint64_t{2} << 20;
  limits.max_file_bytes = uint64_t{1} << 20;
  std::shared_ptr<const moert::Model> model;
  if (!moert_fuzz::clean("load", [&] { model = moert::load_model_buffer(data, size, "", limits); }))
    return 0;
  // What inspection reads: every count is defined.
  (void)model->total_parameters();
  (void)model->activated_parameters();
  moert_fuzz::run_inference(model);
  if (model->total_parameters() <= (uint64_t{1} << 16)) moert_fuzz::run_training(model);
  return 0;
}

// Times saving, loading and resuming a multi-gigabyte checkpoint against the disk's sequential
// rates and the memory's copy rate, measured in the same run on the same files' directory.
//
//   moert_checkpoint_bench [--dir DIR] [--experts N] [--dim D] [--hidden H] [--threads T]
//
// The model is one MoE layer of N experts of D x H (default 64 x 1024 x 1024: 201M parameters,
// 768 MiB); after one AdamW step its checkpoint holds values, gradients and both moments: 3 GiB,
// all but a few KiB in the external data file. "Cold" loads first drop the checkpoint's pages
// from the page cache (posix_fadvise DONTNEED on the clean, fsync'ed files), so they read the
// disk; "warm" ones read the page cache and show the library's own cost (parse, checks, digest,
// copies).
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/content_digest.h"
#include "core/error.h"
#include "core/model_loader.h"
#include "core/session.h"
#include "moert_generated.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// One MoE layer over hidden states, every tensor from an initialiser.
std::vector<uint8_t> model_description(uint32_t experts, uint32_t dim, uint32_t hidden) {
  namespace fb = moert::fb;
  flatbuffers::FlatBufferBuilder b;
  auto init = [&](fb::InitKind kind, float std) {
    const auto how = fb::CreateInit(b, kind, std);
    return fb::CreateTensor(b, 0, fb::DType::F32, 0, nullptr, how);
  };
  const auto norm_w = init(fb::InitKind::Ones, 0.0f);
  const auto norm = fb::CreateRMSNorm(b, dim, 1e-6f, norm_w);
  const auto gate = init(fb::InitKind::Normal, 0.02f);
  const auto w1 = init(fb::InitKind::Uniform, 0.02f);
  const auto w3 = init(fb::InitKind::Uniform, 0.02f);
  const auto w2 = init(fb::InitKind::Uniform, 0.02f);
  const auto balancing = fb::CreateBalancing(b, fb::BalancingPolicy::LossFreeBias);
  const auto moe = fb::CreateMoE(b, dim, experts, 2u, hidden, fb::ScoreFunction::Sigmoid, 1u, 1u,
                                 true, 2.5f, 0, 0, true, balancing, gate, 0, w1, w3, w2);
  const auto norm_name = b.CreateString("norm");
  const auto norm_layer = fb::CreateLayer(b, norm_name, fb::LayerKind::RMSNorm, norm.Union());
  const auto moe_name = b.CreateString("moe");
  const auto moe_layer = fb::CreateLayer(b, moe_name, fb::LayerKind::MoE, moe.Union());
  const auto layers = b.CreateVector(std::vector{norm_layer, moe_layer});
  const auto name = b.CreateString("checkpoint-bench");
  fb::ModelBuilder mb(b);
  mb.add_schema_major(1);
  mb.add_schema_minor(1);
  mb.add_name(name);
  mb.add_input_dim(dim);
  mb.add_layers(layers);
  mb.add_seed(1);
  fb::FinishModelBuffer(b, mb.Finish());
  return {b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize()};
}

uint64_t dir_bytes(const fs::path& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) n += fs::file_size(e.path());
  return n;
}

// Drops the pages of every file in `dir` from the page cache (they are clean: fsync'ed).
void drop_cache(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    const int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Sequential write of `bytes` in 64 MiB pieces, fsync included; then a cold sequential read.
std::pair<double, double> disk_rates(const fs::path& dir, uint64_t bytes) {
  const fs::path p = dir / "disk-probe";
  std::vector<char> buf(size_t{64} << 20);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<char>(i * 131);
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  auto t = Clock::now();
  for (uint64_t done = 0; done < bytes; done += buf.size())
    if (::write(fd, buf.data(), buf.size()) != static_cast<ssize_t>(buf.size())) std::abort();
  ::fsync(fd);
  const double write_s = since(t);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  t = Clock::now();
  uint64_t got = 0;
  for (ssize_t n; (n = ::read(fd, buf.data(), buf.size())) > 0;) got += static_cast<uint64_t>(n);
  const double read_s = since(t);
  ::close(fd);
  fs::remove(p);
  return {static_cast<double>(bytes) / write_s, static_cast<double>(got) / read_s};
}

double memcpy_rate(uint64_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  std::memcpy(b.data(), a.data(), bytes);  // both touched once before timing
  const auto t = Clock::now();
  std::memcpy(b.data(), a.data(), bytes);
  return static_cast<double>(bytes) / since(t);
}

uint64_t arg(int argc, char** argv, const char* name, uint64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::strtoull(argv[i + 1], nullptr, 10);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace moert;
  std::string dir_arg = fs::temp_directory_path() / "moert-checkpoint-bench";
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--dir") == 0) dir_arg = argv[i + 1];
  const uint32_t experts = static_cast<uint32_t>(arg(argc, argv, "--experts", 64));
  const uint32_t dim = static_cast<uint32_t>(arg(argc, argv, "--dim", 1024));
  const uint32_t hidden = static_cast<uint32_t>(arg(argc, argv, "--hidden", 1024));
  const uint32_t threads = static_cast<uint32_t>(arg(argc, argv, "--threads", 2));
  const fs::path dir = dir_arg;
  const fs::path ck_dir = dir / "ck";
  fs::remove_all(dir);
  fs::create_directories(ck_dir);
  const fs::path path = ck_dir / "bench.moert";
  try {
    LoadOptions trusted;
    trusted.max_memory = trusted.max_file_bytes = UINT64_MAX;
    const auto desc = model_description(experts, dim, hidden);
    auto t = Clock::now();
    std::shared_ptr<const Model> model = load_model_buffer(desc.data(), desc.size(), "", trusted);
    std::printf("model: %" PRIu64 " parameters (%.0f MiB), initialised in %.1f s\n",
                model->total_parameters(),
                static_cast<double>(model->total_parameters()) * 4 / (1 << 20), since(t));

    SessionOptions o;
    o.mode = Mode::Training;
    o.threads = threads;
    constexpr uint64_t kRows = 64;
    std::vector<float> x(kRows * dim), y(x.size()), dy(x.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 17) / 17.0f - 0.5f;
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<float>(i % 5) * 1e-3f;
    double save_s = 0, digest_s = 0;
    uint64_t digest_bytes = 0;
    {
      auto a = std::make_unique<Session>(model, o);
      a->zero_grad();
      a->forward_hidden(x.data(), x.size(), kRows, y.data(), y.size());
      a->backward(dy.data(), dy.size(), nullptr, 0);
      t = Clock::now();
      a->step();
      std::printf("one AdamW step: %.2f s\n", since(t));
      t = Clock::now();
      a->save(path.string());
      save_s = since(t);
    }
    const uint64_t bytes = dir_bytes(ck_dir);
    std::printf("checkpoint: %.2f GiB in %zu files\n", static_cast<double>(bytes) / (1 << 30),
                static_cast<size_t>(std::distance(fs::directory_iterator(ck_dir), {})));

    // The digest alone, over the content as the loader holds it (warm: from memory).
    {
      std::unique_ptr<Model> ck = load_checkpoint_file(path.string(), trusted);
      const TrainingStateView view = view_of(*ck->training);
      for (const auto& p : ck->parameters()) digest_bytes += p.tensor->values.size() * 4;
      for (const auto& p : view.params)
        digest_bytes += p.grad.size_bytes() + p.m.size_bytes() + p.v.size_bytes();
      t = Clock::now();
      volatile uint64_t d = checkpoint_digest(*ck, view);
      (void)d;
      digest_s = since(t);
    }

    auto time_model_load = [&](bool cold) {
      if (cold) drop_cache(ck_dir);
      const auto start = Clock::now();
      auto m = load_model_file(path.string(), trusted);
      return since(start);
    };
    auto time_resume = [&](bool cold) {
      Session b(model, o);
      if (cold) drop_cache(ck_dir);
      const auto start = Clock::now();
      b.load(path.string());
      const double s = since(start);
      if (b.step_count() != 1) std::abort();
      return s;
    };
    const double model_cold = time_model_load(true), model_warm = time_model_load(false);
    const double resume_cold = time_resume(true), resume_warm = time_resume(false);
    const auto [disk_write, disk_read] = disk_rates(dir, bytes);
    const double mem = memcpy_rate(uint64_t{1} << 30);

    const double gb = static_cast<double>(bytes) / 1e9;
    std::printf("\n%-44s %9s %9s %9s\n", "operation (3 GiB-class checkpoint)", "seconds", "GB/s",
                "ratio");
    auto row = [](const char* what, double s, double rate, const char* vs, double ref) {
      std::printf("%-44s %9.2f %9.2f %8.2f%s\n", what, s, rate / 1e9, rate / ref, vs);
    };
    row("disk sequential write + fsync (probe)", static_cast<double>(bytes) / disk_write,
        disk_write, " disk", disk_write);
    row("disk sequential read, cold (probe)", static_cast<double>(bytes) / disk_read, disk_read,
        " disk", disk_read);
    row("memcpy, 1 GiB", (1 << 30) / mem, mem, " mem", mem);
    row("XXH3 content digest, from memory", digest_s, static_cast<double>(digest_bytes) / digest_s,
        " mem", mem);
    row("save (digest, write, fsync, rename)", save_s, gb * 1e9 / save_s, " disk wr", disk_write);
    row("load as a model, cold cache", model_cold, gb * 1e9 / model_cold, " disk rd", disk_read);
    row("load as a model, warm cache", model_warm, gb * 1e9 / model_warm, " mem", mem);
    row("resume: training session load, cold", resume_cold, gb * 1e9 / resume_cold, " disk rd",
        disk_read);
    row("resume: training session load, warm", resume_warm, gb * 1e9 / resume_warm, " mem", mem);
    std::printf("(GB/s over the checkpoint's %.2f GB; ratio against the rate named beside it)\n",
                gb);
  } catch (const Error& e) {
    std::fprintf(stderr, "moert_checkpoint_bench: %s\n", e.what());
    return 1;
  }
  fs::remove_all(dir);
  return 0;
}

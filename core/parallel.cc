#include "core/parallel.h"

#include <algorithm>
#include <cstring>

#include "core/backend.h"
#include "core/error.h"

namespace moert {

ParallelContext::ParallelContext(std::shared_ptr<Communicator> world, int ep)
    : world_(std::move(world)), ep_(ep) {
  if (dp() > 1) replicas_ = world_->split(rank() % ep_, rank() / ep_);
}

void ParallelContext::exchange_rows(int64_t rows) {
  rows_.assign(static_cast<size_t>(size()), 0);
  world_->all_gather(&rows, sizeof(int64_t), rows_.data());
  first_row_ = total_rows_ = first_chunk_ = 0;
  aligned_ = true;
  for (int r = 0; r < size(); ++r) {
    if (r == rank()) {
      first_row_ = total_rows_;
      first_chunk_ = aligned_ ? total_rows_ / kReduceRows : first_chunk_;
    }
    total_rows_ += rows_[r];
    if (r + 1 < size() && rows_[r] % kReduceRows != 0) aligned_ = false;
  }
  if (!aligned_) {
    // Chunks laid end to end: each rank cuts its own rows from its first.
    first_chunk_ = 0;
    for (int r = 0; r < rank(); ++r) first_chunk_ += reduce_chunks(rows_[r]);
  }
}

namespace {

// One rank's word in agree(): fixed size, so that one all-gather carries every rank's.
struct Verdict {
  int32_t failed = 0;
  int32_t code = 0;
  char message[248] = {};
};

}  // namespace

void ParallelContext::agree(std::exception_ptr local) {
  Verdict mine;
  if (local) {
    mine.failed = 1;
    mine.code = static_cast<int32_t>(Code::Internal);
    std::string what = "unknown error";
    try {
      std::rethrow_exception(local);
    } catch (const Error& e) {
      mine.code = static_cast<int32_t>(e.code());
      what = e.what();
    } catch (const std::bad_alloc&) {
      mine.code = static_cast<int32_t>(Code::OutOfMemory);
      what = "out of memory";
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    std::strncpy(mine.message, what.c_str(), sizeof(mine.message) - 1);
  }
  std::vector<Verdict> all(static_cast<size_t>(size()));
  world_->all_gather(&mine, sizeof(Verdict), all.data());
  if (local) std::rethrow_exception(local);
  for (int r = 0; r < size(); ++r)
    if (all[r].failed)
      fail(static_cast<Code>(all[r].code), "rank ", r, " of ", size(), " failed: ",
           std::string(all[r].message, strnlen(all[r].message, sizeof(all[r].message))));
}

void ParallelContext::combine(Backend& be, Communicator& comm, const std::vector<GradRoots*>& roots,
                              const std::vector<float*>& acc, const std::vector<int64_t>& n) {
  const size_t G = roots.size();
  // This rank's roots as one byte string: per gradient, its block count, the blocks, then every
  // block's values.
  std::vector<int64_t> header;
  int64_t floats = 0;
  for (size_t g = 0; g < G; ++g) {
    header.push_back(static_cast<int64_t>(roots[g]->blocks.size()));
    for (const TreeBlock& b : roots[g]->blocks) {
      header.push_back(b.begin);
      header.push_back(b.size);
      floats += n[g];
    }
  }
  std::vector<char> mine(header.size() * sizeof(int64_t) + static_cast<size_t>(floats) * 4);
  std::memcpy(mine.data(), header.data(), header.size() * sizeof(int64_t));
  char* v = mine.data() + header.size() * sizeof(int64_t);
  for (size_t g = 0; g < G; ++g)
    for (const Buffer<float>& values : roots[g]->values) {
      be.download(v, values.data(), static_cast<size_t>(n[g]) * 4);
      v += n[g] * 4;
    }
  const int R = comm.size();
  std::vector<int64_t> sizes(static_cast<size_t>(R)), offsets(static_cast<size_t>(R), 0);
  const int64_t my_bytes = static_cast<int64_t>(mine.size());
  comm.all_gather(&my_bytes, sizeof(int64_t), sizes.data());
  for (int r = 1; r < R; ++r) offsets[r] = offsets[r - 1] + sizes[r - 1];
  std::vector<char> all(static_cast<size_t>(offsets[R - 1] + sizes[R - 1]));
  comm.all_gather_v(mine.data(), my_bytes, all.data(), sizes.data(), offsets.data());

  // Every rank's roots of gradient g, in rank order (their chunk ranges are in that order).
  struct Root {
    TreeBlock block;
    const float* values;
  };
  std::vector<std::vector<Root>> per(G);
  for (int r = 0; r < R; ++r) {
    const char* p = all.data() + offsets[r];
    std::vector<std::vector<TreeBlock>> blocks(G);
    for (size_t g = 0; g < G; ++g) {
      int64_t count;
      std::memcpy(&count, p, 8);
      p += 8;
      for (int64_t k = 0; k < count; ++k) {
        int64_t b[2];
        std::memcpy(b, p, 16);
        p += 16;
        blocks[g].push_back({b[0], b[1]});
      }
    }
    for (size_t g = 0; g < G; ++g)
      for (const TreeBlock& b : blocks[g]) {
        per[g].push_back({b, reinterpret_cast<const float*>(p)});
        p += n[g] * 4;
      }
  }
  std::vector<float> host;
  for (size_t g = 0; g < G; ++g) {
    if (per[g].empty()) continue;
    std::sort(per[g].begin(), per[g].end(),
              [](const Root& a, const Root& b) { return a.block.begin < b.block.begin; });
    // Values are folded in copies: the gathered bytes stay as they are.
    std::vector<std::vector<float>> store;
    store.reserve(per[g].size());
    TreeFold<std::vector<float>*> fold(per[g].front().block.begin);
    auto add = [](std::vector<float>* l, std::vector<float>* r) {
      for (size_t i = 0; i < l->size(); ++i) (*l)[i] = (*l)[i] + (*r)[i];
    };
    for (const Root& root : per[g]) {
      store.emplace_back(root.values, root.values + n[g]);
      fold.push_block(root.block, &store.back(), add);
    }
    const std::vector<float>& total = *fold.finish(add);
    host.resize(static_cast<size_t>(n[g]));
    be.download(host.data(), acc[g], host.size() * 4);
    for (size_t i = 0; i < host.size(); ++i) host[i] = host[i] + total[i];
    be.upload(acc[g], host.data(), host.size() * 4);
  }
}

}  // namespace moert

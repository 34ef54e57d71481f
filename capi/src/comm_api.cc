// C entry points for communicators (expert and data parallelism across processes).
#include <algorithm>
#include <cstdint>
#include <memory>

#include "capi/src/handles.h"
#include "core/comm_support.h"

using moert::Code;
using moert::fail;
using moert::capi::guarded;
using moert::capi::require;

extern "C" {

moert_status* moert_comm_create_mpi(const void* mpi_comm, moert_comm** out) {
  return moert_comm_create_mpi_with_timeout(mpi_comm, moert::kDefaultCommTimeoutSeconds, out);
}

moert_status* moert_comm_create_mpi_with_timeout(const void* mpi_comm, double timeout_seconds,
                                                 moert_comm** out) {
  return guarded([&] {
    require(out, "out");
    moert::MpiCommOptions options;
    options.timeout = timeout_seconds;
    auto handle = std::make_unique<moert_comm>();
    handle->comm = moert::make_mpi_communicator(mpi_comm, options);
    *out = handle.release();
  });
}

moert_status* moert_comm_nccl_unique_id(uint8_t* out, uint64_t out_len) {
  return guarded([&] {
    require(out, "out");
    if (out_len < moert::kNcclUniqueIdBytes)
      fail(Code::InvalidArgument, "an NCCL unique id takes ", moert::kNcclUniqueIdBytes,
           " bytes; the buffer holds ", out_len);
    moert::nccl_unique_id(out);
  });
}

moert_status* moert_comm_create_nccl(const uint8_t* in, uint64_t in_len, int32_t rank, int32_t size,
                                     int32_t device, moert_comm** out) {
  return moert_comm_create_nccl_with_timeout(in, in_len, rank, size, device,
                                             moert::kDefaultCommTimeoutSeconds, out);
}

moert_status* moert_comm_create_nccl_with_timeout(const uint8_t* in, uint64_t in_len, int32_t rank,
                                                  int32_t size, int32_t device,
                                                  double timeout_seconds, moert_comm** out) {
  return guarded([&] {
    require(in, "in");
    require(out, "out");
    if (in_len != moert::kNcclUniqueIdBytes)
      fail(Code::InvalidArgument, "an NCCL unique id is ", moert::kNcclUniqueIdBytes,
           " bytes, got ", in_len);
    auto handle = std::make_unique<moert_comm>();
    handle->comm = moert::make_nccl_communicator(in, rank, size, device, timeout_seconds);
    *out = handle.release();
  });
}

void moert_comm_free(moert_comm* comm) { delete comm; }

moert_status* moert_comm_rank(const moert_comm* comm, int32_t* out) {
  return guarded([&] {
    require(comm, "comm");
    require(out, "out");
    *out = comm->comm->rank();
  });
}

moert_status* moert_comm_size(const moert_comm* comm, int32_t* out) {
  return guarded([&] {
    require(comm, "comm");
    require(out, "out");
    *out = comm->comm->size();
  });
}

moert_status* moert_comm_set_timeout(moert_comm* comm, double seconds) {
  return guarded([&] {
    require(comm, "comm");
    comm->comm->set_timeout(seconds);
  });
}

moert_status* moert_comm_barrier(moert_comm* comm) {
  return guarded([&] {
    require(comm, "comm");
    comm->comm->barrier();
  });
}

moert_status* moert_comm_all_reduce_sum(moert_comm* comm, double* data, uint64_t len) {
  return guarded([&] {
    require(comm, "comm");
    if (comm->comm->memory() != moert::CommMemory::Host)
      fail(Code::Unsupported, "moert_comm_all_reduce_sum takes host memory; a ", comm->comm->kind(),
           " communicator moves device memory");
    // A null `data` or a len too large is refused by the communicator, which tells the other
    // ranks (a rank that returned here alone would pair its next call with their all-reduce).
    const auto count = static_cast<int64_t>(std::min<uint64_t>(len, INT64_MAX));
    comm->comm->all_reduce_sum(data, count, moert::ReduceType::F64);
  });
}

moert_status* moert_session_options_set_comm(moert_session_options* options, moert_comm* comm,
                                             int32_t expert_parallel) {
  return guarded([&] {
    require(options, "options");
    options->options.set_comm(comm ? comm->comm : nullptr, expert_parallel);
  });
}

}  // extern "C"

// What every multi-rank GoogleTest program does after its set-up: run the tests on every rank,
// with only rank 0 printing, and fail the job when any rank failed.
#pragma once

#include <gtest/gtest.h>
#include <moert/moert.h>

#include <cstdio>

namespace parallel_test {

// Runs every test on this rank and returns the job's exit code: 1 when any rank failed (their
// verdicts are summed over `comm`), else 0. The other ranks' results reach it through the sum.
inline int run_tests_on_every_rank(moert_comm* comm, int32_t rank) {
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  double failed = rc != 0 ? 1.0 : 0.0;
  moert_status_free(moert_comm_all_reduce_sum(comm, &failed, 1));
  if (rank == 0 && failed > 0) std::fprintf(stderr, "%g rank(s) failed\n", failed);
  return failed > 0 ? 1 : 0;
}

}  // namespace parallel_test

// The row stride of the fp32 backward's Wgrad operands (cpu_ffn.cc, Direct mode), chosen against
// the shape of the L1 data cache.
#pragma once

#include <cstdint>

namespace moert::cpu {

struct L1Geometry {
  int64_t line = 64, sets = 64, ways = 8;  // bytes per line, sets, ways per set
};

// This CPU's L1 data cache (sysconf: CPUID's cache leaves). Unknown, a 32 KiB 8-way cache of
// 64-byte lines (the smaller L1 of the AVX-512 CPUs in use, Zen 4 and Skylake-SP), which pads
// more widths.
L1Geometry l1_geometry();

// Row stride, in floats, for operands of `width` floats: `width`, or `width` + 16 (one line
// more) where unpadded rows would conflict in L1. oneDNN's sgemm reads a "tn" Wgrad partial's
// operands down a chunk's kReduceRows (64) rows; rows s lines apart fall into
// sets / gcd(s, sets) sets, 64 gcd(s, sets) / sets rows in each. Where that exceeds the ways a
// set has to spare (4 kept for the other operand and the tile) the rows evict one another: on
// Zen 5 (64 sets of 12 ways), a dW1 of 1024 rows in [64, 512] tiles ran at 190-193 GFLOP/s with
// rows 512 floats (2 KiB, 32 rows a set) apart and at 199-202 with 528. Rows 512 bytes apart put
// 8 in a set and need no padding there, which spares the backward the copies of x and dy: the
// main job (rows of 128 and 32 floats) runs 3-7 % more steps per second; layers of d = 384
// (8 a set) are unchanged. An 8-way L1 pads them. A multiple of 256 floats is padded on any
// cache: oneDNN's sgemm takes such a stride for a conflicting one (its nocopy checker) and may
// run another kernel. Rows that do not start on a line boundary spread over the sets.
int64_t wgrad_row_stride(int64_t width, const L1Geometry& l1);

}  // namespace moert::cpu

// <immintrin.h> for the files with AVX-512 bodies. GCC 12's AVX-512 intrinsics build some results
// from _mm512_undefined_ps(), which its -Wmaybe-uninitialized (at -O2) and -Wuninitialized (at
// -Og, the asan preset) report once inlined (GCC bug 105593, fixed in GCC 13): silenced for the
// including file.
#pragma once

#include <immintrin.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// MOERT_TEST_SANITIZED: defined to 1 in a build under AddressSanitizer or ThreadSanitizer, whose
// allocators abort on an allocation that cannot be had instead of failing it, so that tests of
// out-of-memory paths skip there.
#pragma once

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MOERT_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define MOERT_TEST_SANITIZED 1
#endif
#endif

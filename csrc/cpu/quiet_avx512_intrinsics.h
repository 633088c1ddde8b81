// GCC 12's AVX-512 intrinsics build their "undefined" vectors as
// `__m512 __Y = __Y;`, which -Wuninitialized reports at every inlined use
// (dozens of false positives per kernel). A kernel that would see them
// includes this first: the pragma has to come before <immintrin.h> (read
// through ATen's vec headers) to cover the lines the warnings point at.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

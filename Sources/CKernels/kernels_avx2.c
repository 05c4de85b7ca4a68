// The AVX2 + FMA set: 6 x 16 GEMM tiles (12 ymm accumulators).
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define KSET(name) name##_avx2
#define KSET_NAME "avx2"
#define TILE_R 6
#define TILE_NP 1
#define SMALL_NP 2
#include "kernels_body.h"
const ember_kernels *ember_kernels_avx2(void) { return &table_avx2; }
#pragma clang attribute pop

// The AVX-512 set: 12 x 32 GEMM tiles (24 zmm accumulators), 16-lane elementwise kernels.
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#define KSET(name) name##_avx512
#define KSET_NAME "avx512"
#define TILE_R 12
#define TILE_NP 2
#define SMALL_NP 4
#define WEIGHTED_COLUMNS 64
#include "kernels_body.h"
const ember_kernels *ember_kernels_avx512(void) { return &table_avx512; }
#pragma clang attribute pop

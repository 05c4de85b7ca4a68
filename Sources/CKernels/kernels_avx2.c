// The AVX2 + FMA set: 6 x 16 GEMM tiles (12 ymm accumulators).
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define KSET(name) name##_avx2
#define KSET_NAME "avx2"
#define TILE_R 6
#define TILE_NP 1
#define SMALL_NP 2
// Columns of the weighted sum per pass over the values: 64 columns for two heads would need 16
// accumulator registers, all of AVX2's, and clang spilled half of them to the stack.
#define WEIGHTED_COLUMNS 32
// The 6 x 16 float tile in hand-scheduled assembly, on a row-major A (every forward projection
// and input gradient) and a k-major one (every weight gradient). clang's loop spent 33
// instructions a k step on 12 FMAs on a row-major A (address adds chained through the six rows,
// register moves, a reload of the prefetch pointer) and 26 on a k-major one; this one spends 24.
// The test of the GEMM forms holds it to the scalar chain bit for bit.
#define KSET_ASM_TILE_6X16 1
#include "kernels_body.h"
const ember_kernels *ember_kernels_avx2(void) { return &table_avx2; }
#pragma clang attribute pop

// Ember's own numeric kernels, compiled twice (AVX2 + FMA, and AVX-512) and chosen at start-up
// from CPUID. Both sets compute every output element with the same sequence of IEEE operations
// (one fused multiply-add chain over k for products, 8-lane partial sums for reductions), so
// they agree bit for bit; the wider set only processes more independent elements at once.
// Swift reaches the kernels through `ember_kernels` (one table per set) and the scalar and
// 8-lane exp below, which are the very same operation sequence as the kernels' exp.
#ifndef EMBER_KERNELS_H
#define EMBER_KERNELS_H

#include <stdint.h>

#pragma STDC FP_CONTRACT OFF

#ifdef __cplusplus
extern "C" {
#endif

typedef float ember_v8 __attribute__((ext_vector_type(8)));
typedef int32_t ember_v8i __attribute__((ext_vector_type(8)));
typedef float ember_v16 __attribute__((ext_vector_type(16)));
typedef int32_t ember_v16i __attribute__((ext_vector_type(16)));

/// Kernel sets, best last. `ember_kernel_set_best()` is the best one this CPU runs.
enum {
    EMBER_KERNELS_NONE = 0,     // CPU lacks AVX2 + FMA: no set runs here
    EMBER_KERNELS_AVX2 = 1,     // AVX2 + FMA (x86-64-v3)
    EMBER_KERNELS_AVX512 = 2,   // AVX-512 F/BW/DQ/VL
};

/// Columns per packed panel of B (the layout is the same for every set).
#define EMBER_PANEL 16

typedef struct ember_kernels {
    const char *name;
    /// Rows per full tile of the GEMM micro-kernel (informational).
    int tile_rows;
    /// Columns per full tile of the GEMM micro-kernel (informational).
    int tile_cols;

    /// C[m, n] (row stride ldc) for op(A)[m, kc] · B[kc, n], B given as panels of EMBER_PANEL
    /// columns (panel p at panels + p * panel_stride, row kk of a panel at + kk * EMBER_PANEL,
    /// zero past n). op(A)(r, kk) = a[r * a_rs + kk * a_ks], with a_ks == 1 or a_rs == 1.
    /// Each element: acc = (load_c ? C : 0); acc = fma(op(A)(r, kk), B(kk, j), acc) for
    /// kk = 0..<kc in order; then acc *= alpha when `finish` and alpha != 1; C = acc.
    /// `prefetch`, when not NULL, is pulled into cache one 64-byte line per k step while the first
    /// row tile runs (the next block of a streamed weight matrix).
    void (*gemm_block)(const float *a, long a_rs, long a_ks, int m, const float *panels, long panel_stride,
                       int n, long kc, float *c, long ldc, float alpha, int load_c, int finish,
                       const float *prefetch);

    /// `gemm_block` over panels of bfloat16 values (panel_stride counted in elements): the same
    /// chains as over float panels holding those values.
    void (*gemm_block_bf16)(const float *a, long a_rs, long a_ks, int m, const uint16_t *panels, long panel_stride,
                            int n, long kc, float *c, long ldc, float alpha, int load_c, int finish,
                            const uint16_t *prefetch);
    /// `pack_panels` into bfloat16 panels (each value rounded to nearest even, `ember_bf16_bits`).
    void (*pack_panels_bf16)(const float *b, long b_ks, long b_cs, long kc, int n, uint16_t *dst, long panel_stride);

    /// Packs columns 0..<n of B(kk, j) = b[kk * b_ks + j * b_cs] (kk < kc) as panels of
    /// EMBER_PANEL columns at dst + p * panel_stride, row kk at + kk * EMBER_PANEL, zero past n.
    void (*pack_panels)(const float *b, long b_ks, long b_cs, long kc, int n, float *dst, long panel_stride);

    /// scores[j] = scale * dot(q, keys + j * stride) for j < count; with q2 != NULL also
    /// scores2[j] = scale * dot(q2, ...) (two query heads sharing a KV head).
    void (*score_rows)(float *scores, float *scores2, const float *q, const float *q2, const float *keys,
                       long stride, int count, int hs, float scale);
    /// o[d] = scale * Σ_j w[j] * values[j * stride + d] (fma chain over j per element); with
    /// o2 != NULL also o2 from w2 and scale2.
    void (*weighted_sum)(float *o, float *o2, const float *w, const float *w2, const float *values,
                         long stride, int count, int hs, float scale, float scale2);
    /// For j < count: d_j[i] = fma(coef[j], src[i], d_j[i]) over i < hs, with d_j = dst + j * stride;
    /// with dst2 != NULL the same for dst2, coef2, src2 (attention backward's dK and dV rows).
    void (*scatter_rows)(float *dst, const float *coef, const float *src, float *dst2, const float *coef2,
                         const float *src2, long stride, int count, int hs);
    /// y[i] = fma(alpha, x[i], y[i]).
    void (*axpy)(float alpha, const float *x, float *y, long n);
    /// out[i] = exp(x[i] - shift) (may alias), returns their 8-lane sum (see ember_sum8).
    float (*exp_shift_sum)(float *out, const float *x, long n, float shift);
    /// Σ exp(x[i] - shift) in the same order, nothing stored.
    float (*exp_sum)(const float *x, long n, float shift);
    /// h[i] = silu(g[i]) * u[i] over n elements.
    void (*swiglu_forward)(float *h, const float *g, const float *u, long n);
    /// du[i] = dh * g * s, dg[i] = dh * u * s * (1 + g * (1 - s)), s = sigmoid(g).
    void (*swiglu_backward)(float *dg, float *du, const float *dh, const float *g, const float *u, long n);
    /// The sum of n floats, each read once (four vector partial sums): the benchmark's memory
    /// read bandwidth at this set's load width.
    float (*read_sum)(const float *p, long n);
    /// 1 when every one of the n floats is finite, else 0.
    int (*all_finite)(const float *x, long n);
} ember_kernels;

/// The table of a set (NULL when the set is unknown).
const ember_kernels *ember_kernels_table(int set);
/// Tells glibc's malloc to keep large freed blocks for reuse (no mmap per large allocation).
void ember_keep_freed_memory(void);
/// The best set this CPU supports (CPUID and the OS's saved-state mask).
int ember_kernel_set_best(void);

// MARK: - exp, shared by the kernels and Swift

#define EMBER_EXP_LO (-87.3365447504019f)
#define EMBER_EXP_HI (88.3762626647949f)

/// e^x lane-wise (Cephes expf polynomial, about 1 ulp). NaN stays NaN, x > 88.38 gives +inf,
/// x < -87.34 gives 0. Plain multiplies and adds (no fusing), so every width gives the same bits.
#define EMBER_EXP_DEFINE(NAME, V, VI)                                                          \
    static inline __attribute__((always_inline)) V NAME(V x) {                                 \
        VI below = x < EMBER_EXP_LO, above = x > EMBER_EXP_HI, nan = x != x;                   \
        V c = (V)(((VI)x & ~below) | ((VI)(V)(EMBER_EXP_LO) & below));                         \
        c = (V)(((VI)c & ~above) | ((VI)(V)(EMBER_EXP_HI) & above));                           \
        c = (V)((VI)c & ~nan);                                                                 \
        V magic = 12582912.0f;                                                                 \
        V t = c * 1.44269504088896341f;                                                        \
        t = t + magic;                                                                         \
        V fx = t - magic;                                                                      \
        V q = fx * 0.693359375f;                                                               \
        V r = c - q;                                                                           \
        q = fx * -2.12194440e-4f;                                                              \
        r = r - q;                                                                             \
        V z = r * r;                                                                           \
        V y = 1.9875691500e-4f;                                                                \
        y = y * r; y = y + 1.3981999507e-3f;                                                   \
        y = y * r; y = y + 8.3334519073e-3f;                                                   \
        y = y * r; y = y + 4.1665795894e-2f;                                                   \
        y = y * r; y = y + 1.6666665459e-1f;                                                   \
        y = y * r; y = y + 5.0000001201e-1f;                                                   \
        y = y * z; y = y + r; y = y + 1.0f;                                                    \
        VI n = (VI)t - 0x4B400000;                                                             \
        V scale = (V)((n + 127) << 23);                                                        \
        V res = y * scale;                                                                     \
        res = (V)((VI)res & ~below);                                                           \
        res = (V)(((VI)res & ~above) | ((VI)(V)(__builtin_inff()) & above));                   \
        res = (V)(((VI)res & ~nan) | ((VI)x & nan));                                           \
        return res;                                                                            \
    }

EMBER_EXP_DEFINE(ember_exp8, ember_v8, ember_v8i)
EMBER_EXP_DEFINE(ember_exp16, ember_v16, ember_v16i)

/// e^x for one value: lane 0 of `ember_exp8` (bit-identical to every vector path).
static inline float ember_exp1(float x) { return ember_exp8((ember_v8)(x))[0]; }

/// x rounded to bfloat16 (nearest, ties to even; NaN stays a quiet NaN): the upper 16 bits.
static inline uint16_t ember_bf16_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/// x rounded to the nearest bfloat16 value, as a float.
static inline float ember_bf16_round(float x) {
    uint32_t u = (uint32_t)ember_bf16_bits(x) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

/// The one horizontal sum of 8 lanes: left to right, ((l0 + l1) + l2) + ... + l7.
static inline __attribute__((always_inline)) float ember_sum8(ember_v8 v) {
    float s = v[0];
    s = s + v[1]; s = s + v[2]; s = s + v[3]; s = s + v[4]; s = s + v[5]; s = s + v[6]; s = s + v[7];
    return s;
}

#ifdef __cplusplus
}
#endif
#endif

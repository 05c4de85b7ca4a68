// The kernel bodies, included once per kernel set by kernels_avx2.c and kernels_avx512.c under a
// `#pragma clang attribute` that sets the target features. The including file defines:
//   KSET(name)   the set's suffix for every exported symbol
//   TILE_R       rows of the full GEMM tile; TILE_NP panels (16 columns each) per full tile
//   SMALL_NP     panels per tile when m <= 2 (decoding: more independent chains per k step)
// Vectors are clang extended vectors: a 16-float vector is one zmm register with AVX-512 and two
// ymm registers with AVX2, the same lane-wise operations either way. Products accumulate by
// fused multiply-adds, one chain per output element in a fixed order; nothing else is fused
// (the C target builds with -ffp-contract=off).
#include "include/ember_kernels.h"
#include <stdlib.h>
#include <string.h>

typedef ember_v16 v16;
typedef ember_v8 v8;
typedef ember_v16i v16i;

#define INLINE static inline __attribute__((always_inline))

INLINE v16 load16(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
INLINE v8 load8(const float *p) { v8 v; memcpy(&v, p, 32); return v; }
INLINE void store16(float *p, v16 v) { memcpy(p, &v, 64); }
INLINE void store8(float *p, v8 v) { memcpy(p, &v, 32); }
INLINE v16 splat16(float x) { return (v16)(x); }
INLINE v16 fma16(v16 a, v16 b, v16 c) { return __builtin_elementwise_fma(a, b, c); }
INLINE v8 fma8(v8 a, v8 b, v8 c) { return __builtin_elementwise_fma(a, b, c); }
INLINE v8 lo8(v16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
INLINE v8 hi8(v16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
INLINE v16 join16(v8 lo, v8 hi) { return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
INLINE v16 loadn16(const float *p, int n) { float t[16] = {0}; for (int i = 0; i < n; i++) t[i] = p[i]; return load16(t); }
INLINE void storen16(float *p, v16 v, int n) { float t[16]; store16(t, v); for (int i = 0; i < n; i++) p[i] = t[i]; }

// MARK: - GEMM micro-tiles

// R rows x NP panels. FORM_ROWS: op(A) rows are `rs` apart, k contiguous (a_ks == 1);
// otherwise rows contiguous and k steps `ks` apart (a_rs == 1).
// BF16: panels hold bfloat16 values (expanded to float exactly: the bits shifted up by 16), so a
// chain over bf16 panels is the chain over float panels holding the same values.
INLINE v16 load_bf16(const uint16_t *p) {
    typedef uint16_t u16x16 __attribute__((ext_vector_type(16)));
    u16x16 h; memcpy(&h, p, 32);
    v16i w = __builtin_convertvector(h, v16i);
    return (v16)(w << 16);
}

INLINE void tile(const int R, const int NP, const int FORM_ROWS, const int BF16, const float *a, long rs, long ks,
                 const void *bvoid, long pstride, long kc, float *c, long ldc, int cols, float alpha,
                 int load_c, int finish, const void *pfvoid) {
    const float *b = (const float *)bvoid;
    const uint16_t *bh = (const uint16_t *)bvoid;
    const float *pf = (const float *)pfvoid;
    v16 acc[TILE_R > 4 ? TILE_R : 4][SMALL_NP > TILE_NP ? SMALL_NP : TILE_NP];
#pragma clang loop unroll(full)
    for (int r = 0; r < R; r++) {
#pragma clang loop unroll(full)
        for (int p = 0; p < NP; p++) {
            int w = cols - p * 16;
            if (!load_c || w <= 0) acc[r][p] = (v16)(0.0f);
            else if (w >= 16) acc[r][p] = load16(c + r * ldc + p * 16);
            else acc[r][p] = loadn16(c + r * ldc + p * 16, w);
        }
    }
    const char *pfb = (const char *)pf;
#if defined(KSET_ASM_TILE_6X16) && defined(__x86_64__)
    // The full float tile, scheduled by hand (kernels_avx2.c says why). Same operations in the
    // same order as the loop below: per k step, per row, one FMA per lane.
    if (R == 6 && NP == 1 && !BF16 && kc > 0) {
        v8 c00 = lo8(acc[0][0]), c01 = hi8(acc[0][0]), c10 = lo8(acc[1][0]), c11 = hi8(acc[1][0]);
        v8 c20 = lo8(acc[2][0]), c21 = hi8(acc[2][0]), c30 = lo8(acc[3][0]), c31 = hi8(acc[3][0]);
        v8 c40 = lo8(acc[4][0]), c41 = hi8(acc[4][0]), c50 = lo8(acc[5][0]), c51 = hi8(acc[5][0]);
        // One pointer a row, past the block's end, and one byte index from -kc steps up to 0:
        // a k step is 4 bytes along a row-major row, or `ks` floats down a k-major block. Each
        // broadcast is one base + index address, and the index's add ends the loop (add/jnz
        // fuse). The prefetch reads the next tile's panel at a fixed distance from this one
        // (the panel itself when there is none).
        long step = FORM_ROWS ? 4 : ks * 4, rowGap = FORM_ROWS ? rs : 1;
        const char *a0 = (const char *)a + kc * step;
        const char *a1 = a0 + rowGap * 4, *a2 = a0 + 2 * rowGap * 4, *a3 = a0 + 3 * rowGap * 4;
        const char *a4 = a0 + 4 * rowGap * 4, *a5 = a0 + 5 * rowGap * 4;
        const float *bp = b;
        long i = -kc * step;
        long pdelta = pfb ? (long)(pfb - (const char *)b) : 0;
        __asm__ volatile(
            ".p2align 5\n"
            "1:\n\t"
            "vmovups (%[bp]), %%ymm13\n\t"
            "vmovups 32(%[bp]), %%ymm14\n\t"
            "prefetcht0 (%[bp],%[pd])\n\t"
            "vbroadcastss (%[a0],%[i],1), %%ymm15\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %[c00]\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %[c01]\n\t"
            "vbroadcastss (%[a1],%[i],1), %%ymm15\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %[c10]\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %[c11]\n\t"
            "vbroadcastss (%[a2],%[i],1), %%ymm15\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %[c20]\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %[c21]\n\t"
            "vbroadcastss (%[a3],%[i],1), %%ymm15\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %[c30]\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %[c31]\n\t"
            "vbroadcastss (%[a4],%[i],1), %%ymm15\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %[c40]\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %[c41]\n\t"
            "vbroadcastss (%[a5],%[i],1), %%ymm15\n\t"
            "vfmadd231ps %%ymm13, %%ymm15, %[c50]\n\t"
            "vfmadd231ps %%ymm14, %%ymm15, %[c51]\n\t"
            "addq $64, %[bp]\n\t"
            "addq %[step], %[i]\n\t"
            "jnz 1b\n\t"
            : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
              [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41),
              [c50] "+x"(c50), [c51] "+x"(c51), [bp] "+r"(bp), [i] "+r"(i)
            : [a0] "r"(a0), [a1] "r"(a1), [a2] "r"(a2), [a3] "r"(a3), [a4] "r"(a4), [a5] "r"(a5),
              [pd] "r"(pdelta), [step] "r"(step)
            : "xmm13", "xmm14", "xmm15", "cc", "memory");
        acc[0][0] = join16(c00, c01); acc[1][0] = join16(c10, c11); acc[2][0] = join16(c20, c21);
        acc[3][0] = join16(c30, c31); acc[4][0] = join16(c40, c41); acc[5][0] = join16(c50, c51);
        kc = 0;
    }
#endif
    for (long kk = 0; kk < kc; kk++) {
        v16 bv[SMALL_NP > TILE_NP ? SMALL_NP : TILE_NP];
#pragma clang loop unroll(full)
        for (int p = 0; p < NP; p++) bv[p] = BF16 ? load_bf16(bh + p * pstride + kk * 16) : load16(b + p * pstride + kk * 16);
        // The next column tile's panels, one line of each per k step (a tall tile has the
        // cycles for it: 32-row decode streams its weights while it computes). Small tiles
        // prefetch only the first panel.
        if (pfb) {
#pragma clang loop unroll(full)
            for (int p = 0; p < (R >= 8 ? NP : 1); p++) __builtin_prefetch(pfb + p * pstride * (BF16 ? 2 : 4) + kk * (BF16 ? 32 : 64));
        }
#pragma clang loop unroll(full)
        for (int r = 0; r < R; r++) {
            float av = FORM_ROWS ? a[r * rs + kk] : a[kk * ks + r];
            v16 s = splat16(av);
#pragma clang loop unroll(full)
            for (int p = 0; p < NP; p++) acc[r][p] = fma16(s, bv[p], acc[r][p]);
        }
    }
#pragma clang loop unroll(full)
    for (int r = 0; r < R; r++) {
#pragma clang loop unroll(full)
        for (int p = 0; p < NP; p++) {
            int w = cols - p * 16;
            if (w <= 0) continue;
            v16 v = acc[r][p];
            if (finish && alpha != 1.0f) v = v * alpha;
            if (w >= 16) store16(c + r * ldc + p * 16, v);
            else storen16(c + r * ldc + p * 16, v, w);
        }
    }
}

// One row tile of R rows against column tiles of NP panels (R, NP, form known at compile time).
#define TILE_CASE(R, NP, FORM)                                                                       \
    tile(R, NP, FORM, BF, FORM ? a + r0 * rs : a + r0, rs, ks, b, pstride, kc, c + r0 * ldc, ldc, cols, alpha, \
         load_c, finish, r0 == 0 ? pf : 0)

// Rows r0..<m against one column tile (np panels, `cols` valid columns) for one form.
#define ROW_LOOP(NP, FORM)                                                                           \
    do {                                                                                             \
        int r0 = 0;                                                                                  \
        while (r0 < m) {                                                                             \
            int left = m - r0;                                                                       \
            if (left >= TILE_R) { TILE_CASE(TILE_R, NP, FORM); r0 += TILE_R; }                       \
            else if (TILE_R > 8 && left >= 8) { TILE_CASE(8, NP, FORM); r0 += 8; }                   \
            else if (left >= 4) { TILE_CASE(4, NP, FORM); r0 += 4; }                                 \
            else if (left >= 2) { TILE_CASE(2, NP, FORM); r0 += 2; }                                 \
            else { TILE_CASE(1, NP, FORM); r0 += 1; }                                                \
        }                                                                                            \
    } while (0)

// A column tile of np panels: np is known at compile time in each case.
#if SMALL_NP >= 4 || TILE_NP >= 4
#define NP_CASES_34(FORM) case 3: ROW_LOOP(3, FORM); break; case 4: ROW_LOOP(4, FORM); break;
#else
#define NP_CASES_34(FORM)
#endif
#define NP_SWITCH(FORM)                                                                              \
    switch (np) {                                                                                    \
    case 1: ROW_LOOP(1, FORM); break;                                                                \
    case 2: ROW_LOOP(2, FORM); break;                                                                \
    NP_CASES_34(FORM)                                                                                \
    }

// Per-thread copy of an A block (transposed, or rows whose stride aliases in L1).
static __thread float *KSET(a_buffer);
static __thread long KSET(a_capacity);

INLINE float *KSET(a_block_buffer)(long need) {
    if (need > KSET(a_capacity)) {
        free(KSET(a_buffer));
        KSET(a_buffer) = aligned_alloc(64, ((need * 4 + 63) / 64) * 64);
        KSET(a_capacity) = KSET(a_buffer) ? need : 0;
    }
    return KSET(a_buffer);
}

// How many of a row tile's lines share one L1 set (64 sets of 64-byte lines: addresses 4 KB
// apart share a set) when its rows are `stride` floats apart and `kc` floats long.
INLINE int rows_per_set(long stride, long kc) {
    unsigned char count[64] = {0};
    long span = kc * 4 < 4096 ? kc * 4 : 4096;
    int worst = 0;
    for (int r = 0; r < TILE_R; r++) {
        long off = (long)(((unsigned long)r * (unsigned long)stride * 4) & 4095);
        for (long byte = 0; byte < span; byte += 64) {
            int set = (int)(((off + byte) >> 6) & 63);
            if (++count[set] > worst) worst = count[set];
        }
    }
    return worst;
}

// A stride (floats) to copy an A block's rows to when theirs aliases in L1, or 0 to read them in
// place. Rows 1,024, 2,048 or 3,072 floats apart put every row of a tile in the same sets: the
// tile then runs at about half its rate (docs/benchmarks.md, session 18). Rows end to end put
// ceil(rows x span / 4 KB) lines in a set; two a set measured as harmless (896-float rows),
// three as a loss (1,536-float rows: 48-60 against 70-85 GFLOP/s). The search is bounded: the
// least crowded of 64 padded strides, taken only when it beats the rows' own.
INLINE long unaliased_stride(long stride, long kc) {
    long span = kc * 4 < 4096 ? kc * 4 : 4096;
    int least = (int)((TILE_R * span + 4095) / 4096);
    int allowed = least > 2 ? least : 2;
    int have = rows_per_set(stride, kc);
    if (have <= allowed) return 0;
    long best = 0;
    int bestCount = have;
    for (long pad = 0; pad < 64 * 16; pad += 16) {
        int got = rows_per_set(kc + pad, kc);
        if (got < bestCount) { best = kc + pad; bestCount = got; }
        if (got <= allowed) break;
    }
    return best;
}

INLINE void gemm_block_impl(const int BF, const float *a, long rs, long ks, int m, const void *panelsv, long pstride,
                            int n, long kc, float *c, long ldc, float alpha, int load_c, int finish,
                            const void *prefetch) {
    const char *panels = (const char *)panelsv;
    const long esize = BF ? 2 : 4;
    if (m <= 0 || n <= 0) return;
    int panelCount = (n + 15) / 16;
    int tileNP = m <= 2 ? SMALL_NP : TILE_NP;
    int formRows = ks == 1;
    // A transposed (rows contiguous, k steps `ks` apart): copy the block once into a per-thread
    // buffer with rows packed by k step (a 48-byte run per step instead of one per row tile and
    // step, read again for every column tile).
    if (!formRows && m > 2 && n > TILE_NP * 16) {
        float *buf = KSET(a_block_buffer)((long)m * kc);
        if (buf) {
            for (long kk = 0; kk < kc; kk++) memcpy(buf + kk * m, a + kk * ks, (size_t)m * 4);
            a = buf; ks = m;
        }
    }
    // Rows whose stride aliases in L1: copy the block's rows once, to a stride that does not
    // (the same values in the same order, so the same bits).
    long stride = formRows && m >= TILE_R && n > TILE_NP * 16 ? unaliased_stride(rs, kc) : 0;
    if (stride > 0) {
        float *buf = KSET(a_block_buffer)((long)m * stride);
        if (buf) {
            for (int r = 0; r < m; r++) memcpy(buf + r * stride, a + r * rs, (size_t)kc * 4);
            a = buf; rs = stride;
        }
    }
    for (int p0 = 0; p0 < panelCount; p0 += tileNP) {
        int np = panelCount - p0 < tileNP ? panelCount - p0 : tileNP;
        int cols = n - p0 * 16;
        if (cols > np * 16) cols = np * 16;
        const void *b = panels + p0 * pstride * esize;
        float *cc = c + p0 * 16;
        // Next column tile of this block, or the caller's next block after the last one.
        const void *pf = p0 + np < panelCount ? panels + (p0 + np) * pstride * esize : prefetch;
        {
            float *c0 = c; c = cc;
            if (formRows) { NP_SWITCH(1) } else { NP_SWITCH(0) }
            c = c0;
        }
    }
}

static void KSET(gemm_block)(const float *a, long rs, long ks, int m, const float *panels, long pstride,
                             int n, long kc, float *c, long ldc, float alpha, int load_c, int finish,
                             const float *prefetch) {
    gemm_block_impl(0, a, rs, ks, m, panels, pstride, n, kc, c, ldc, alpha, load_c, finish, prefetch);
}

static void KSET(gemm_block_bf16)(const float *a, long rs, long ks, int m, const uint16_t *panels, long pstride,
                                  int n, long kc, float *c, long ldc, float alpha, int load_c, int finish,
                                  const uint16_t *prefetch) {
    gemm_block_impl(1, a, rs, ks, m, panels, pstride, n, kc, c, ldc, alpha, load_c, finish, prefetch);
}

static void KSET(pack_panels)(const float *b, long b_ks, long b_cs, long kc, int n, float *dst, long pstride) {
    for (int j0 = 0, p = 0; j0 < n; j0 += 16, p++) {
        int w = n - j0 < 16 ? n - j0 : 16;
        float *panel = dst + p * pstride;
        if (b_cs == 1 && w == 16) {
            for (long kk = 0; kk < kc; kk++) store16(panel + kk * 16, load16(b + kk * b_ks + j0));
        } else if (b_ks == 1) {
            // Transposed source: each column is contiguous in k.
            for (int lane = 0; lane < 16; lane++) {
                if (lane < w) { const float *src = b + (j0 + lane) * b_cs; for (long kk = 0; kk < kc; kk++) panel[kk * 16 + lane] = src[kk]; }
                else for (long kk = 0; kk < kc; kk++) panel[kk * 16 + lane] = 0;
            }
        } else {
            for (long kk = 0; kk < kc; kk++)
                for (int lane = 0; lane < 16; lane++) panel[kk * 16 + lane] = lane < w ? b[kk * b_ks + (j0 + lane) * b_cs] : 0;
        }
    }
}

static void KSET(pack_panels_bf16)(const float *b, long b_ks, long b_cs, long kc, int n, uint16_t *dst, long pstride) {
    for (int j0 = 0, p = 0; j0 < n; j0 += 16, p++) {
        int w = n - j0 < 16 ? n - j0 : 16;
        uint16_t *panel = dst + p * pstride;
        for (int lane = 0; lane < 16; lane++) {
            if (lane < w) { const float *src = b + (j0 + lane) * b_cs; for (long kk = 0; kk < kc; kk++) panel[kk * 16 + lane] = ember_bf16_bits(src[kk * b_ks]); }
            else for (long kk = 0; kk < kc; kk++) panel[kk * 16 + lane] = 0;
        }
    }
}

// MARK: - Attention rows

// Σ q[d]·k[d]: 8-lane fma chains over d, ember_sum8, then a plain tail (d >= HS rounded down to 8).
INLINE float dot_tail(float s, const float *q, const float *k, int d0, int hs) {
    for (int d = d0; d < hs; d++) s = s + q[d] * k[d];
    return s;
}

#ifndef ATTN_AHEAD
#define ATTN_AHEAD 8
#endif

// Attention's walk over cached keys and values is strided (a cache row holds every KV head),
// which the hardware prefetchers follow poorly: the row ATTN_AHEAD rows on, `width` floats of
// it, is requested one cache line at a time.
INLINE void prefetch_row_ahead(const float *row, long stride, int width) {
    for (int d = 0; d < width; d += 16) __builtin_prefetch(row + ATTN_AHEAD * stride + d);
}

// Scores of keys j..j+3 from two 16-lane accumulators (two keys each, 8 lanes a key).
INLINE void four_scores(float *out, v16 x01, v16 x23, const float *q, const float *k0, const float *k1,
                        const float *k2, const float *k3, int hs8, int hs, float scale) {
    out[0] = dot_tail(ember_sum8(__builtin_shufflevector(x01, x01, 0, 1, 2, 3, 4, 5, 6, 7)), q, k0, hs8, hs) * scale;
    out[1] = dot_tail(ember_sum8(__builtin_shufflevector(x01, x01, 8, 9, 10, 11, 12, 13, 14, 15)), q, k1, hs8, hs) * scale;
    out[2] = dot_tail(ember_sum8(__builtin_shufflevector(x23, x23, 0, 1, 2, 3, 4, 5, 6, 7)), q, k2, hs8, hs) * scale;
    out[3] = dot_tail(ember_sum8(__builtin_shufflevector(x23, x23, 8, 9, 10, 11, 12, 13, 14, 15)), q, k3, hs8, hs) * scale;
}

static void KSET(score_rows)(float *scores, float *scores2, const float *q, const float *q2, const float *keys,
                             long stride, int count, int hs, float scale) {
    int hs8 = hs & ~7;
    int j = 0;
    // Two keys per 16-lane vector: lanes 0-7 key j, lanes 8-15 key j+1; each half is the 8-lane
    // chain of one key.
    for (; j + 4 <= count; j += 4) {
        const float *k0 = keys + j * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
        if (j + ATTN_AHEAD + 4 <= count)
            for (int r = 0; r < 4; r++) prefetch_row_ahead(keys + (j + r) * stride, stride, hs);
        v16 a01 = 0, a23 = 0, b01 = 0, b23 = 0;
        for (int d = 0; d < hs8; d += 8) {
            v8 qv = load8(q + d);
            v16 qq = __builtin_shufflevector(qv, qv, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
            v16 k01 = __builtin_shufflevector(load8(k0 + d), load8(k1 + d), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            v16 k23 = __builtin_shufflevector(load8(k2 + d), load8(k3 + d), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            a01 = fma16(qq, k01, a01);
            a23 = fma16(qq, k23, a23);
            if (q2) {
                v8 qv2 = load8(q2 + d);
                v16 qq2 = __builtin_shufflevector(qv2, qv2, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
                b01 = fma16(qq2, k01, b01);
                b23 = fma16(qq2, k23, b23);
            }
        }
        four_scores(scores + j, a01, a23, q, k0, k1, k2, k3, hs8, hs, scale);
        if (q2) four_scores(scores2 + j, b01, b23, q2, k0, k1, k2, k3, hs8, hs, scale);
    }
    for (; j < count; j++) {
        const float *k0 = keys + j * stride;
        v8 a = 0, b = 0;
        for (int d = 0; d < hs8; d += 8) {
            v8 kv = load8(k0 + d);
            a = fma8(load8(q + d), kv, a);
            if (q2) b = fma8(load8(q2 + d), kv, b);
        }
        scores[j] = dot_tail(ember_sum8(a), q, k0, hs8, hs) * scale;
        if (q2) scores2[j] = dot_tail(ember_sum8(b), q2, k0, hs8, hs) * scale;
    }
}

// o[d] over one block of up to 64 columns (4 vectors): fma chain over j per element.
INLINE void weighted_block(float *o, float *o2, const float *w, const float *w2, const float *v, long stride,
                           int count, int width, float scale, float scale2) {
    v16 a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    if (width == 64) {
        for (int j = 0; j < count; j++) {
            const float *vj = v + j * stride;
            if (j + ATTN_AHEAD < count) prefetch_row_ahead(vj, stride, 64);
            v16 p = splat16(w[j]);
            v16 x0 = load16(vj), x1 = load16(vj + 16), x2 = load16(vj + 32), x3 = load16(vj + 48);
            a0 = fma16(p, x0, a0); a1 = fma16(p, x1, a1); a2 = fma16(p, x2, a2); a3 = fma16(p, x3, a3);
            if (o2) {
                v16 p2 = splat16(w2[j]);
                b0 = fma16(p2, x0, b0); b1 = fma16(p2, x1, b1); b2 = fma16(p2, x2, b2); b3 = fma16(p2, x3, b3);
            }
        }
        store16(o, a0 * scale); store16(o + 16, a1 * scale); store16(o + 32, a2 * scale); store16(o + 48, a3 * scale);
        if (o2) { store16(o2, b0 * scale2); store16(o2 + 16, b1 * scale2); store16(o2 + 32, b2 * scale2); store16(o2 + 48, b3 * scale2); }
        return;
    }
    if (width == 32) {
        for (int j = 0; j < count; j++) {
            const float *vj = v + j * stride;
            if (j + ATTN_AHEAD < count) prefetch_row_ahead(vj, stride, 32);
            v16 p = splat16(w[j]);
            v16 x0 = load16(vj), x1 = load16(vj + 16);
            a0 = fma16(p, x0, a0); a1 = fma16(p, x1, a1);
            if (o2) {
                v16 p2 = splat16(w2[j]);
                b0 = fma16(p2, x0, b0); b1 = fma16(p2, x1, b1);
            }
        }
        store16(o, a0 * scale); store16(o + 16, a1 * scale);
        if (o2) { store16(o2, b0 * scale2); store16(o2 + 16, b1 * scale2); }
        return;
    }
    // Narrower blocks: 16 columns at a time, the last one partial.
    for (int c0 = 0; c0 < width; c0 += 16) {
        int n = width - c0 < 16 ? width - c0 : 16;
        v16 a = 0, b = 0;
        for (int j = 0; j < count; j++) {
            const float *vj = v + j * stride + c0;
            v16 x = n == 16 ? load16(vj) : loadn16(vj, n);
            a = fma16(splat16(w[j]), x, a);
            if (o2) b = fma16(splat16(w2[j]), x, b);
        }
        if (n == 16) store16(o + c0, a * scale); else storen16(o + c0, a * scale, n);
        if (o2) { if (n == 16) store16(o2 + c0, b * scale2); else storen16(o2 + c0, b * scale2, n); }
    }
}

static void KSET(weighted_sum)(float *o, float *o2, const float *w, const float *w2, const float *values,
                               long stride, int count, int hs, float scale, float scale2) {
    for (int d = 0; d < hs; d += WEIGHTED_COLUMNS) {
        int width = hs - d < WEIGHTED_COLUMNS ? hs - d : WEIGHTED_COLUMNS;
        weighted_block(o + d, o2 ? o2 + d : 0, w, w2, values + d, stride, count, width, scale, scale2);
    }
}

static void KSET(scatter_rows)(float *dst, const float *coef, const float *src, float *dst2, const float *coef2,
                               const float *src2, long stride, int count, int hs) {
    if (hs == 64) {
        v16 s0 = load16(src), s1 = load16(src + 16), s2 = load16(src + 32), s3 = load16(src + 48);
        v16 t0 = 0, t1 = 0, t2 = 0, t3 = 0;
        if (dst2) { t0 = load16(src2); t1 = load16(src2 + 16); t2 = load16(src2 + 32); t3 = load16(src2 + 48); }
        for (int j = 0; j < count; j++) {
            float *d = dst + j * stride;
            v16 c = splat16(coef[j]);
            store16(d, fma16(c, s0, load16(d))); store16(d + 16, fma16(c, s1, load16(d + 16)));
            store16(d + 32, fma16(c, s2, load16(d + 32))); store16(d + 48, fma16(c, s3, load16(d + 48)));
            if (dst2) {
                float *e = dst2 + j * stride;
                v16 c2 = splat16(coef2[j]);
                store16(e, fma16(c2, t0, load16(e))); store16(e + 16, fma16(c2, t1, load16(e + 16)));
                store16(e + 32, fma16(c2, t2, load16(e + 32))); store16(e + 48, fma16(c2, t3, load16(e + 48)));
            }
        }
        return;
    }
    for (int j = 0; j < count; j++) {
        float *d = dst + j * stride;
        int i = 0;
        for (; i + 16 <= hs; i += 16) store16(d + i, fma16(splat16(coef[j]), load16(src + i), load16(d + i)));
        for (; i < hs; i++) d[i] = __builtin_fmaf(coef[j], src[i], d[i]);
        if (dst2) {
            float *e = dst2 + j * stride;
            i = 0;
            for (; i + 16 <= hs; i += 16) store16(e + i, fma16(splat16(coef2[j]), load16(src2 + i), load16(e + i)));
            for (; i < hs; i++) e[i] = __builtin_fmaf(coef2[j], src2[i], e[i]);
        }
    }
}

static void KSET(axpy)(float alpha, const float *x, float *y, long n) {
    long i = 0;
    v16 va = splat16(alpha);
    for (; i + 16 <= n; i += 16) store16(y + i, fma16(va, load16(x + i), load16(y + i)));
    for (; i < n; i++) y[i] = __builtin_fmaf(alpha, x[i], y[i]);
}

// MARK: - exp and sums

// Elements go to lane i % 8 of one 8-lane accumulator, added in index order; a partial last
// block is padded with -inf (exp gives 0, which adds exactly).
INLINE float exp_sum_impl(float *out, const float *x, long n, float shift) {
    v8 acc = 0;
    long i = 0;
    v16 s = splat16(shift);
    for (; i + 16 <= n; i += 16) {
        v16 e = ember_exp16(load16(x + i) - s);
        if (out) store16(out + i, e);
        acc = acc + lo8(e);
        acc = acc + hi8(e);
    }
    if (i < n) {
        float t[16];
        for (int l = 0; l < 16; l++) t[l] = i + l < n ? x[i + l] : -__builtin_inff();
        v16 e = ember_exp16(load16(t) - s);
        if (out) { float u[16]; store16(u, e); for (long l = 0; i + l < n; l++) out[i + l] = u[l]; }
        acc = acc + lo8(e);
        if (n - i > 8) acc = acc + hi8(e);
    }
    return ember_sum8(acc);
}

static float KSET(exp_shift_sum)(float *out, const float *x, long n, float shift) { return exp_sum_impl(out, x, n, shift); }
static float KSET(exp_sum)(const float *x, long n, float shift) { return exp_sum_impl(0, x, n, shift); }

// MARK: - SwiGLU

INLINE v16 loadpad(const float *p, long n) { return n >= 16 ? load16(p) : loadn16(p, (int)n); }
INLINE void storepad(float *p, v16 v, long n) { if (n >= 16) store16(p, v); else storen16(p, v, (int)n); }

static void KSET(swiglu_forward)(float *h, const float *g, const float *u, long n) {
    for (long i = 0; i < n; i += 16) {
        long w = n - i;
        v16 x = loadpad(g + i, w), up = loadpad(u + i, w);
        v16 e = ember_exp16(-x);
        v16 den = 1.0f + e;
        v16 v = x / den;
        v = v * up;
        storepad(h + i, v, w);
    }
}

static void KSET(swiglu_backward)(float *dg, float *du, const float *dh, const float *g, const float *u, long n) {
    for (long i = 0; i < n; i += 16) {
        long w = n - i;
        v16 x = loadpad(g + i, w), up = loadpad(u + i, w), d = loadpad(dh + i, w);
        v16 e = ember_exp16(-x);
        v16 den = 1.0f + e;
        v16 s = 1.0f / den;
        v16 xs = x * s;
        storepad(du + i, d * xs, w);
        v16 one_s = 1.0f - s;
        v16 t = x * one_s;
        t = 1.0f + t;
        v16 dgv = d * up;
        dgv = dgv * s;
        dgv = dgv * t;
        storepad(dg + i, dgv, w);
    }
}

static float KSET(read_sum)(const float *p, long n) {
    v16 s0 = (v16)(0.0f), s1 = s0, s2 = s0, s3 = s0;
    long i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = s0 + load16(p + i); s1 = s1 + load16(p + i + 16);
        s2 = s2 + load16(p + i + 32); s3 = s3 + load16(p + i + 48);
    }
    v16 s = (s0 + s1) + (s2 + s3);
    float t = 0;
    for (int j = 0; j < 16; j++) t += s[j];
    for (; i < n; i++) t += p[i];
    return t;
}

static int KSET(all_finite)(const float *x, long n) {
    // A value is not finite when its exponent bits are all set: OR over (~bits & exponent) == 0.
    const int32_t *b = (const int32_t *)x;
    const v16i e = (v16i)(0x7f800000), zero = (v16i)(0);
    v16i bad = zero;
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        v16i v;
        __builtin_memcpy(&v, b + i, sizeof v);
        bad |= (~v & e) == zero;
    }
    int any = 0;
    for (int j = 0; j < 16; j++) any |= bad[j];
    for (; i < n; i++) any |= (~b[i] & 0x7f800000) == 0;
    return !any;
}

static const ember_kernels KSET(table) = {
    .name = KSET_NAME,
    .tile_rows = TILE_R,
    .tile_cols = TILE_NP * 16,
    .gemm_block = KSET(gemm_block),
    .pack_panels = KSET(pack_panels),
    .gemm_block_bf16 = KSET(gemm_block_bf16),
    .pack_panels_bf16 = KSET(pack_panels_bf16),
    .score_rows = KSET(score_rows),
    .weighted_sum = KSET(weighted_sum),
    .scatter_rows = KSET(scatter_rows),
    .axpy = KSET(axpy),
    .exp_shift_sum = KSET(exp_shift_sum),
    .exp_sum = KSET(exp_sum),
    .swiglu_forward = KSET(swiglu_forward),
    .swiglu_backward = KSET(swiglu_backward),
    .read_sum = KSET(read_sum),
    .all_finite = KSET(all_finite),
};

// Which kernel set this CPU runs: CPUID feature bits, and XGETBV for the register state the OS
// saves (AVX needs YMM state, AVX-512 also opmask and ZMM state).
#include "include/ember_kernels.h"
#include <cpuid.h>

const ember_kernels *ember_kernels_avx2(void);
const ember_kernels *ember_kernels_avx512(void);

static unsigned long long xgetbv0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

int ember_kernel_set_best(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return EMBER_KERNELS_NONE;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!(fma && osxsave && avx)) return EMBER_KERNELS_NONE;
    unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return EMBER_KERNELS_NONE;   // SSE and YMM state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return EMBER_KERNELS_NONE;
    int avx2 = (b >> 5) & 1;
    if (!avx2) return EMBER_KERNELS_NONE;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    if (avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xE0) == 0xE0) return EMBER_KERNELS_AVX512;
    return EMBER_KERNELS_AVX2;
}

const ember_kernels *ember_kernels_table(int set) {
    switch (set) {
    case EMBER_KERNELS_AVX2: return ember_kernels_avx2();
    case EMBER_KERNELS_AVX512: return ember_kernels_avx512();
    default: return 0;
    }
}

#include <malloc.h>

void ember_keep_freed_memory(void) {
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

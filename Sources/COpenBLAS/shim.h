// OpenBLAS through its CBLAS interface (Debian: libopenblas-dev, pthread flavour).
#include <cblas.h>

// A software prefetch (into all cache levels) for kernels that stream weights they are about to
// use; Swift has no spelling of its own for it.
static inline void ember_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

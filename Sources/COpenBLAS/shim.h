// OpenBLAS through its CBLAS interface (Debian: libopenblas-dev, pthread flavour).
#include <cblas.h>

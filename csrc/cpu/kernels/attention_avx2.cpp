// The CPU attention kernels compiled for the avx2 instruction set (flags in CMakeLists.txt).
#define FUSEDATTN_ISA_NAMESPACE avx2
#define FUSEDATTN_ISA_NAME "avx2"
#define FUSEDATTN_VECTOR_FLOATS 8
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 2
#include "cpu/attention_kernel.inc"

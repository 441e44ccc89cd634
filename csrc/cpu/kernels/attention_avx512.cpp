// The CPU attention kernels compiled for the avx512 instruction set (flags in CMakeLists.txt).
#define FUSEDATTN_ISA_NAMESPACE avx512
#define FUSEDATTN_ISA_NAME "avx512"
#define FUSEDATTN_VECTOR_FLOATS 16
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 4
#include "cpu/attention_kernel.inc"

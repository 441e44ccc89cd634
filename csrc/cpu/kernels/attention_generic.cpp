// The CPU attention kernels compiled for the generic instruction set (flags in CMakeLists.txt).
#define FUSEDATTN_ISA_NAMESPACE generic
#define FUSEDATTN_ISA_NAME "generic"
#define FUSEDATTN_VECTOR_FLOATS 4
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 2
#include "cpu/attention_kernel.inc"

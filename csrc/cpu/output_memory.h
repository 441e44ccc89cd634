// Output tensors of the CPU entry points: the whole 2 MiB pages of a large output advised
// transparent huge pages when its memory is fresh from the OS (output_memory.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>

namespace fusedattn::cpu {

// Outputs span at least two of these before any of their pages is advised.
constexpr size_t kHugePageBytes = size_t(2) << 20;

// An uninitialized contiguous CPU tensor from torch's allocator, as at::empty. When it
// spans at least 4 MiB and its memory is fresh (its last page not resident: a new mapping,
// not reused heap memory), the 2 MiB pages wholly inside it are advised MADV_HUGEPAGE.
at::Tensor empty_output(c10::IntArrayRef sizes, at::ScalarType dtype);

// Whether the page holding address is resident (true where this cannot be known).
bool page_resident(const void* address);

}  // namespace fusedattn::cpu

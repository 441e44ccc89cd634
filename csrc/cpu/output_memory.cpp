// Large outputs in transparent huge pages when their memory is fresh.
//
// A freshly mapped output (glibc maps every block above its mmap threshold: 32 MiB by
// default once it has adapted, 128 KiB in a process that fixed it with mallopt) costs one
// page fault per 4 KiB page when the kernel writes it: 1-3 us each on the development VM,
// 20 ms for the 32 MiB fp32 output of a B16 H32 S128 D128 prefill. The whole 2 MiB pages
// inside such a block, advised MADV_HUGEPAGE before anything touches them (THP in "madvise"
// mode, the common default), cost one fault each. The block stays torch's (its allocator,
// its deleter, its memory accounting); memory glibc reuses from its heap is resident
// already and left as it is (no fault to save; advising it would only split the heap's
// mapping).
#include "cpu/output_memory.h"

#include <ATen/EmptyTensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fusedattn::cpu {

bool page_resident(const void* address) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char state = 1;
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(address) / page * page);
  if (mincore(start, page, &state) != 0) return true;
  return (state & 1) != 0;
#else
  (void)address;
  return true;
#endif
}

at::Tensor empty_output(c10::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor output = at::detail::empty_cpu(sizes, dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = output.nbytes();
  // Only the last page tells a fresh mapping from reused heap memory: glibc's own chunk
  // header makes a fresh mapping's first page resident.
  if (bytes >= 2 * kHugePageBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(output.data_ptr());
    const uintptr_t first = (begin + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    const uintptr_t last = (begin + bytes) / kHugePageBytes * kHugePageBytes;
    if (last > first && !page_resident(reinterpret_cast<const void*>(begin + bytes - 1)))
      madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return output;
}

}  // namespace fusedattn::cpu

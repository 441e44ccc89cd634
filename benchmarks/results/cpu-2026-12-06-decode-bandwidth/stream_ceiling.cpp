// Stand-alone ceiling of the decode access pattern (issue 16): per KV head, keys in tiles
// of 64, the tile's K rows then its V rows (two streams per head), read from buffers larger
// than L3, with no / partial / full arithmetic and several prefetch structures.
//
//   g++ -O3 -march=native -fopenmp stream_ceiling.cpp -o stream_ceiling
//   ./stream_ceiling DTYPE ARITH PREFETCH HINT DISTANCE HUGE THREADS SPLIT [KEYS] [REPS]
//     DTYPE    fp32 | bf16            (D 128, 8 KV heads, GQA group 4)
//     ARITH    sum | partial | full | kernel  (1 FMA or dot product per loaded vector, or 4:
//              the group; kernel: as full, in the order the kernel first touches each line:
//              K by groups of 16 keys, line d of all 16 rows then line d + 1; V by halves of
//              the row, the half of all 64 rows then the other half; kernel_group_prefetch:
//              kernel order, each group of 16 K rows prefetched (t0) line by line in memory
//              order before its products, and each V row's second half prefetched when its
//              first half is read; kernel_linear_k: K rows read whole, one key after the
//              other (V as kernel_group_prefetch); linear_rows2: K as kernel_linear_k, V read
//              whole rows in key order twice, 2 query rows per pass (the second pass from cache))
//     PREFETCH none | tile | lines   (tile: next tile in one burst before the tile, as the
//                                     kernel does; lines: each 64-byte line read prefetches
//                                     the line DISTANCE bytes ahead in the same stream)
//     HINT     0 (nta) | 1 (t2) | 2 (t1) | 3 (t0): __builtin_prefetch locality
//     HUGE     0: madvise(MADV_NOHUGEPAGE) (as torch's allocator leaves 4 KB pages), 1: MADV_HUGEPAGE
//     SPLIT    heads (whole heads per thread, dynamic as the kernel) | keys (every head, a
//              contiguous key range per thread)
// Prints one JSON line: GB/s of K+V bytes read (wall, best and median of REPS passes) and
// the calling thread's CPU time per pass.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kHeads = 8, kDim = 128, kGroup = 4, kTile = 64;

double now(clockid_t clock) {
  timespec t;
  clock_gettime(clock, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

char* allocate(size_t bytes, bool huge) {
  const size_t align = size_t(2) << 20;
  bytes = (bytes + align - 1) / align * align;
  char* p = static_cast<char*>(std::aligned_alloc(align, bytes));
  madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  for (size_t i = 0; i < bytes; i += 4096) p[i] = 1;
  std::memset(p, 0, bytes);  // bf16/fp32 zeros: no NaN, no denormals
  return p;
}

struct Config {
  bool bf16;
  std::string arith, prefetch;
  int hint;
  long distance;
  int threads;
  bool split_keys;
  long keys;
};

template <int Hint>
inline void prefetch(const char* p) {
  __builtin_prefetch(p, 0, Hint);
}

// One stream's rows [first, first + count) of a head: row_bytes each, consumed 64 bytes at
// a time; returns work folded into acc so nothing is optimized away.
template <int Hint, bool Lines, int Fmas, bool Bf16>
inline void consume(const char* base, long row_bytes, long first, long count, long distance, __m512* acc,
                    const __m512* q) {
  const char* p = base + first * row_bytes;
  const long bytes = count * row_bytes;
  for (long b = 0; b < bytes; b += 64) {
    if constexpr (Lines) prefetch<Hint>(p + b + distance);
    const __m512i raw = _mm512_load_si512(p + b);
    if constexpr (Fmas == 0) {
      acc[0] = _mm512_add_ps(acc[0], _mm512_castsi512_ps(raw));
    } else if constexpr (Bf16) {
      for (int r = 0; r < Fmas; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)q[r], (__m512bh)raw);
    } else {
      for (int r = 0; r < Fmas; ++r) acc[r] = _mm512_fmadd_ps(q[r], _mm512_castsi512_ps(raw), acc[r]);
    }
  }
}

// The kernel's first-touch order (decode_scores, decode_values): K of a tile by groups of
// 16 keys, each 64-byte line across the group's rows; V by halves of each row over all rows.
template <int Hint, bool Lines, bool Bf16, int Order>
inline void consume_kernel_order(const char* k, const char* v, long row_bytes, long first, long count,
                                 long distance, __m512* acc, const __m512* q) {
  auto touch = [&](const char* p) {
    if constexpr (Lines) prefetch<Hint>(p + distance);
    const __m512i raw = _mm512_load_si512(p);
    for (int r = 0; r < kGroup; ++r) {
      if constexpr (Bf16)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)q[r], (__m512bh)raw);
      else
        acc[r] = _mm512_fmadd_ps(q[r], _mm512_castsi512_ps(raw), acc[r]);
    }
  };
  const char* keys = k + first * row_bytes;
  for (long g = 0; g < count; g += 16) {
    const long end = std::min(count, g + 16);
    if constexpr (Order == 1)
      for (long b = g * row_bytes; b < end * row_bytes; b += 64) __builtin_prefetch(keys + b, 0, 3);
    if constexpr (Order >= 2) {
      for (long t = g; t < end; ++t)
        for (long line = 0; line < row_bytes; line += 64) touch(keys + t * row_bytes + line);
    } else {
      for (long line = 0; line < row_bytes; line += 64)
        for (long t = g; t < end; ++t) touch(keys + t * row_bytes + line);
    }
  }
  const char* values = v + first * row_bytes;
  if constexpr (Order == 3) {
    for (int pass = 0; pass < 2; ++pass)
      for (long b = 0; b < count * row_bytes; b += 64) {
        const __m512i raw = _mm512_load_si512(values + b);
        for (int r = 2 * pass; r < 2 * pass + 2; ++r) {
          if constexpr (Bf16)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)q[r], (__m512bh)raw);
          else
            acc[r] = _mm512_fmadd_ps(q[r], _mm512_castsi512_ps(raw), acc[r]);
        }
      }
    return;
  }
  for (long half = 0; half < row_bytes; half += row_bytes / 2)
    for (long j = 0; j < count; ++j) {
      if constexpr (Order > 0)
        if (half == 0)
          for (long line = row_bytes / 2; line < row_bytes; line += 64)
            __builtin_prefetch(values + j * row_bytes + line, 0, 3);
      for (long line = half; line < half + row_bytes / 2; line += 64) touch(values + j * row_bytes + line);
    }
}

template <int Hint, bool Lines, bool Tile, int Fmas, bool Bf16>
float run_item(const char* k, const char* v, long head_bytes, long row_bytes, long key_begin, long key_end,
               long distance) {
  __m512 acc[kGroup], q[kGroup];
  for (int r = 0; r < kGroup; ++r) acc[r] = _mm512_setzero_ps(), q[r] = _mm512_set1_ps(0.5f + r);
  (void)head_bytes;
  for (long tile = key_begin; tile < key_end; tile += kTile) {
    const long count = std::min<long>(kTile, key_end - tile);
    if constexpr (Tile) {
      if (tile + kTile < key_end) {
        const long next = std::min<long>(kTile, key_end - tile - kTile) * row_bytes;
        const char* nk = k + (tile + kTile) * row_bytes;
        const char* nv = v + (tile + kTile) * row_bytes;
        for (long b = 0; b < next; b += 64) prefetch<Hint>(nk + b);
        for (long b = 0; b < next; b += 64) prefetch<Hint>(nv + b);
      }
    }
    if constexpr (Fmas < 0) {
      consume_kernel_order<Hint, Lines, Bf16, -1 - Fmas>(k, v, row_bytes, tile, count, distance, acc, q);
    } else {
      consume<Hint, Lines, Fmas, Bf16>(k, row_bytes, tile, count, distance, acc, q);
      consume<Hint, Lines, Fmas, Bf16>(v, row_bytes, tile, count, distance, acc, q);
    }
  }
  __m512 total = acc[0];
  for (int r = 1; r < kGroup; ++r) total = _mm512_add_ps(total, acc[r]);
  return _mm512_reduce_add_ps(total);
}

using ItemFunction = float (*)(const char*, const char*, long, long, long, long, long);

template <int Hint, bool Lines, bool Tile, int Fmas>
ItemFunction pick_dtype(bool bf16) {
  return bf16 ? run_item<Hint, Lines, Tile, Fmas, true> : run_item<Hint, Lines, Tile, Fmas, false>;
}
template <int Hint, bool Lines, bool Tile>
ItemFunction pick_arith(const Config& c) {
  if (c.arith == "sum") return pick_dtype<Hint, Lines, Tile, 0>(c.bf16);
  if (c.arith == "partial") return pick_dtype<Hint, Lines, Tile, 1>(c.bf16);
  if (c.arith == "kernel") return pick_dtype<Hint, Lines, Tile, -1>(c.bf16);
  if (c.arith == "kernel_group_prefetch") return pick_dtype<Hint, Lines, Tile, -2>(c.bf16);
  if (c.arith == "kernel_linear_k") return pick_dtype<Hint, Lines, Tile, -3>(c.bf16);
  if (c.arith == "linear_rows2") return pick_dtype<Hint, Lines, Tile, -4>(c.bf16);
  return pick_dtype<Hint, Lines, Tile, kGroup>(c.bf16);
}
template <int Hint>
ItemFunction pick_prefetch(const Config& c) {
  if (c.prefetch == "tile") return pick_arith<Hint, false, true>(c);
  if (c.prefetch == "lines") return pick_arith<Hint, true, false>(c);
  return pick_arith<Hint, false, false>(c);
}
ItemFunction pick(const Config& c) {
  switch (c.hint) {
    case 0: return pick_prefetch<0>(c);
    case 1: return pick_prefetch<1>(c);
    case 2: return pick_prefetch<2>(c);
    default: return pick_prefetch<3>(c);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 9) {
    std::fprintf(stderr, "usage: %s fp32|bf16 sum|partial|full none|tile|lines HINT DISTANCE HUGE THREADS heads|keys [KEYS] [REPS]\n", argv[0]);
    return 2;
  }
  Config c{std::string(argv[1]) == "bf16", argv[2], argv[3], std::atoi(argv[4]), std::atol(argv[5]),
           std::atoi(argv[7]), std::string(argv[8]) == "keys", argc > 9 ? std::atol(argv[9]) : 32768};
  const bool huge = std::atoi(argv[6]) != 0;
  const int reps = argc > 10 ? std::atoi(argv[10]) : 7;
  const long row_bytes = kDim * (c.bf16 ? 2 : 4);
  const long head_bytes = c.keys * row_bytes;
  // Slack past the end so the line prefetch DISTANCE ahead never leaves the buffer.
  char* k = allocate(kHeads * head_bytes + c.distance + 4096, huge);
  char* v = allocate(kHeads * head_bytes + c.distance + 4096, huge);
  const ItemFunction item = pick(c);
  omp_set_num_threads(c.threads);
  std::vector<double> wall, cpu;
  volatile float sink = 0;
  for (int rep = 0; rep < reps + 1; ++rep) {
    const double start = now(CLOCK_MONOTONIC), start_cpu = now(CLOCK_THREAD_CPUTIME_ID);
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      if (c.split_keys) {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const long chunk = (c.keys / kTile + n - 1) / n * kTile;
        const long begin = std::min(c.keys, t * chunk), end = std::min(c.keys, begin + chunk);
        for (int h = 0; h < kHeads; ++h)
          total += item(k + h * head_bytes, v + h * head_bytes, head_bytes, row_bytes, begin, end, c.distance);
      } else {
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < kHeads; ++h)
          total += item(k + h * head_bytes, v + h * head_bytes, head_bytes, row_bytes, 0, c.keys, c.distance);
      }
    }
    sink = sink + total;
    if (rep > 0) {  // the first pass warms up
      wall.push_back(now(CLOCK_MONOTONIC) - start);
      cpu.push_back(now(CLOCK_THREAD_CPUTIME_ID) - start_cpu);
    }
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu.begin(), cpu.end());
  const double bytes = 2.0 * kHeads * head_bytes;
  std::printf(
      "{\"dtype\": \"%s\", \"arith\": \"%s\", \"prefetch\": \"%s\", \"hint\": %d, \"distance\": %ld, \"huge\": %d, "
      "\"threads\": %d, \"split\": \"%s\", \"keys\": %ld, \"gb_per_s_best\": %.2f, \"gb_per_s_median\": %.2f, "
      "\"gb_per_s_cpu\": %.2f, \"cpu_ms_median\": %.3f, \"wall_ms_median\": %.3f}\n",
      c.bf16 ? "bf16" : "fp32", c.arith.c_str(), c.prefetch.c_str(), c.hint, c.distance, huge ? 1 : 0, c.threads,
      c.split_keys ? "keys" : "heads", c.keys, bytes / wall[0] / 1e9, bytes / wall[wall.size() / 2] / 1e9,
      bytes / cpu[cpu.size() / 2] / 1e9, cpu[cpu.size() / 2] * 1e3, wall[wall.size() / 2] * 1e3);
  return sink == 12345.0f ? 1 : 0;
}

// Every byte value through the production conversions of decode_step.inc (byte tables in the order of the queries' layout; int8 split halves).
// Build from the repository root: g++ -O3 -ffp-contract=fast -fno-math-errno -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp -std=c++17 -Icsrc benchmarks/results/cpu-2026-12-06-issue18/byte_tables_exhaustive.cpp -o /tmp/exhaustive
// Every byte through the production conversions of decode_step.inc (byte tables, int8 split halves).
#define FUSEDATTN_ISA_NAMESPACE avx512bf16
#define FUSEDATTN_ISA_NAME "avx512bf16"
#define FUSEDATTN_VECTOR_FLOATS 16
#define FUSEDATTN_GEMM_ROWS 6
#define FUSEDATTN_GEMM_VECTORS 4
#include "cpu/attention_kernel.inc"
#include <cstdio>
namespace fusedattn::cpu::avx512bf16 { namespace {
uint16_t expected_bits(bool is_int8, uint8_t byte) {
  float value = is_int8 ? float(int8_t(byte)) : float8_e4m3_to_float(byte);
  uint32_t bits; std::memcpy(&bits, &value, 4);
  if (value != value) return 0x7fc0 | (byte & 0x80 ? 0x8000 : 0);
  return bits >> 16;
}
template <typename Storage> int check() {
  int bad = 0;
  const ByteTableRegisters tables = byte_table_registers<Storage>();
  for (int base = 0; base < 256; base += 64) {
    alignas(64) Storage in[64];
    for (int i = 0; i < 64; ++i) in[i] = Storage(base + i);
    __m512i first, second;
    bfloat16_by_tables<Storage>(_mm512_load_si512(in), tables, &first, &second);
    alignas(64) uint16_t out[64];
    _mm512_store_si512(out, first); _mm512_store_si512(out + 32, second);
    for (int d = 0; d < 32; ++d) {  // two keys of 32 values: the first at its place, the second 16 further
      if (out[query_place<KeyPairing::unpacked_bytes>(d)] != expected_bits(std::is_same_v<Storage, int8_t>, uint8_t(in[d]))) ++bad;
      if (out[query_place<KeyPairing::unpacked_bytes>(d) + 16] != expected_bits(std::is_same_v<Storage, int8_t>, uint8_t(in[32 + d]))) ++bad;
    }
    if constexpr (std::is_same_v<Storage, int8_t>) {
      for (int h = 0; h < 64; h += 32) {
        alignas(64) uint16_t pairs[32];
        _mm512_store_si512(pairs, (__m512i)exact_bfloat16_pairs(int8_floats(in + h), int8_floats(in + h + 16)));
        for (int d = 0; d < 32; ++d)
          if (pairs[query_place<KeyPairing::split_halves>(d)] != expected_bits(true, uint8_t(in[h + d]))) ++bad;
      }
    }
  }
  return bad;
}
}}
int main() {
  using namespace fusedattn::cpu::avx512bf16;
  std::printf("int8 wrong: %d, float8 wrong: %d (of 256 each)\n", check<int8_t>(), check<uint8_t>());
}

// Per-core arithmetic ceilings of an AVX2 CPU: what the int8 GEMM kernels can reach at most, and fp32 for comparison.
//
//   c++ -O2 -mavx2 -mfma benchmarks/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak [--json]
//
// Each line runs one instruction mix in a loop of independent register chains (no memory traffic except where
// noted, and then from L1), on one thread, and reports multiply-accumulates per second (GMAC/s): the median of
// --repeats timings (default 7) of ~0.2 s each, the mixes taking turns. Mixes:
//   fp32_fma          vfmadd231ps: 8 fp32 MACs per instruction (what torch's fp32 GEMM runs).
//   int16_madd        vpmaddwd alone: 16 int16 MACs per instruction (products summed in pairs to int32).
//   int16_madd_add    vpmaddwd + vpaddd: the arithmetic of osengine's exact int8 GEMM (no VNNI), one int32
//                     accumulation per product vector.
//   w8a8_kernel_step  one k-pair step of the 6 x 16 microkernel: 2 vpmovsxbw W loads, 6 vpbroadcastd A loads,
//                     12 vpmaddwd, 12 vpaddd (operands in L1).
//   u8s8_maddubs      vpmaddubsw alone: 32 u8 x s8 MACs per instruction, int16 pair sums that saturate — not usable
//                     for general int8 x int8 without VNNI, shown for reference.
//   fbgemm_mix        vpmaddubsw + vpmaddwd(x, 1) + vpaddd per 32 MACs: FBGEMM's AVX2 int8 arithmetic. Exact only
//                     while the u8 x s8 pair sums cannot saturate, which is why torch's dynamic int8 Linear on
//                     fbgemm quantizes activations to 7 bits (reduce_range=True); one add per 32 MACs where the
//                     exact int16 scheme needs two.
//   sign_trick_step   one 4-k step of a 4 x 16 microkernel with the exact vpmaddubsw "sign trick" (u8 = |a|,
//                     s8 = sign(a) * w via vpsignb, then vpmaddwd(x, 1) + vpaddd): 8-bit activations without
//                     saturation, at the price of a vpsignb per product vector.
// On a CPU with AVX-512 VNNI (skipped elsewhere; the asm needs no compiler flags):
//   fp32_fma_zmm      vfmadd231ps on zmm: 16 fp32 MACs per instruction (oneDNN's fp32 GEMM on such a CPU).
//   vnni_dpbusd       vpdpbusd on zmm alone: 64 u8 x s8 MACs per instruction, exact int32 sums.
//   vnni_w8a8_step    one 4-k step of the avx512_vnni backend's 8 x 16 W8 tile: 1 zmm W load, 8 vpbroadcastd A
//                     loads, 8 vpdpbusd (operands in L1).
// The ratio w8a8_kernel_step / fp32_fma bounds how much faster the W8A8 GEMM can be than an fp32 GEMM that runs at
// the FMA peak on this core; fbgemm_mix / w8a8_kernel_step is the head start of FBGEMM's 7-bit arithmetic.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

#define CLOBBER_ALL "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
                    "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory"
#define FMA(x) "vfmadd231ps %%ymm12, %%ymm13, %%ymm" #x "\n\t"
#define MADD(x) "vpmaddwd %%ymm12, %%ymm13, %%ymm" #x "\n\t"
#define MADDUBS(x) "vpmaddubsw %%ymm12, %%ymm13, %%ymm" #x "\n\t"
#define TWELVE(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
// Products go to ymm15 each time (register renaming keeps several in flight), then accumulate.
#define MADD_ADD(x0, x1)                                                   \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                                 \
  "vpaddd %%ymm15, %%ymm" #x0 ", %%ymm" #x0 "\n\t"                        \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"                                 \
  "vpaddd %%ymm15, %%ymm" #x1 ", %%ymm" #x1 "\n\t"
#define ROW(off, x0, x1)                                                   \
  "vpbroadcastd " #off "(%[a]), %%ymm14\n\t"                              \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                                 \
  "vpaddd %%ymm15, %%ymm" #x0 ", %%ymm" #x0 "\n\t"                        \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"                                 \
  "vpaddd %%ymm15, %%ymm" #x1 ", %%ymm" #x1 "\n\t"

// FBGEMM's mix: u8 x s8 pair sums (vpmaddubsw) widened by vpmaddwd with ones (ymm13), one int32 add.
#define UBS_MADD_ADD(x)                                                    \
  "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"                              \
  "vpmaddwd %%ymm13, %%ymm15, %%ymm15\n\t"                                \
  "vpaddd %%ymm15, %%ymm" #x ", %%ymm" #x "\n\t"
// Sign trick, one row of the 4 x 16 step: ymm13 = 4 activation bytes broadcast, ymm14 = their |a|, ymm10/11 = W for
// columns 0..7 / 8..15 (4 k each), ymm12 = int16 ones.
#define SIGN_ROW(off, x0, x1)                                              \
  "vpbroadcastd " #off "(%[a]), %%ymm13\n\t"                             \
  "vpbroadcastd " #off "+64(%[a]), %%ymm14\n\t"                          \
  "vpsignb %%ymm13, %%ymm10, %%ymm15\n\t"                                 \
  "vpmaddubsw %%ymm15, %%ymm14, %%ymm15\n\t"                              \
  "vpmaddwd %%ymm12, %%ymm15, %%ymm15\n\t"                                \
  "vpaddd %%ymm15, %%ymm" #x0 ", %%ymm" #x0 "\n\t"                        \
  "vpsignb %%ymm13, %%ymm11, %%ymm15\n\t"                                 \
  "vpmaddubsw %%ymm15, %%ymm14, %%ymm15\n\t"                              \
  "vpmaddwd %%ymm12, %%ymm15, %%ymm15\n\t"                                \
  "vpaddd %%ymm15, %%ymm" #x1 ", %%ymm" #x1 "\n\t"

// AVX-512 mixes: products into zmm0..11 from zmm12/13 (or a broadcast into zmm14); vzeroupper at the end.
#define FMA_ZMM(x) "vfmadd231ps %%zmm12, %%zmm13, %%zmm" #x "\n\t"
#define DPBUSD(x) "vpdpbusd %%zmm12, %%zmm13, %%zmm" #x "\n\t"
#define VNNI_ROW(off, x)                                                   \
  "vpbroadcastd " #off "(%[a]), %%zmm14\n\t"                             \
  "vpdpbusd %%zmm12, %%zmm14, %%zmm" #x "\n\t"

alignas(64) std::int8_t w_bytes[64];
alignas(64) std::int32_t a_pairs[32];

struct Mix {
  const char* name;
  double macs_per_iteration;
  void (*run)(std::int64_t iterations);
};

void run_fp32_fma(std::int64_t n) {
  asm volatile("vxorps %%xmm12, %%xmm12, %%xmm12\n\tvxorps %%xmm13, %%xmm13, %%xmm13\n\t"
               "1:\n\t" TWELVE(FMA) "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}
void run_int16_madd(std::int64_t n) {
  asm volatile("vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"
               "1:\n\t" TWELVE(MADD) "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}
void run_int16_madd_add(std::int64_t n) {
  asm volatile("vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"
               "vpxor %%xmm14, %%xmm14, %%xmm14\n\t"
               "1:\n\t" MADD_ADD(0, 1) MADD_ADD(2, 3) MADD_ADD(4, 5) MADD_ADD(6, 7) MADD_ADD(8, 9) MADD_ADD(10, 11)
               "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}
void run_w8a8_kernel_step(std::int64_t n) {
  asm volatile("1:\n\t"
               "vpmovsxbw (%[w]), %%ymm12\n\t"
               "vpmovsxbw 16(%[w]), %%ymm13\n\t" ROW(0, 0, 1) ROW(4, 2, 3) ROW(8, 4, 5) ROW(12, 6, 7) ROW(16, 8, 9)
                   ROW(20, 10, 11) "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               : [w] "r"(w_bytes), [a] "r"(a_pairs)
               : CLOBBER_ALL);
}
void run_u8s8_maddubs(std::int64_t n) {
  asm volatile("vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"
               "1:\n\t" TWELVE(MADDUBS) "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}

void run_fbgemm_mix(std::int64_t n) {
  asm volatile("vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"
               "vpxor %%xmm14, %%xmm14, %%xmm14\n\t"
               "1:\n\t" TWELVE(UBS_MADD_ADD) "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}
void run_sign_trick_step(std::int64_t n) {
  asm volatile("vpcmpeqw %%ymm12, %%ymm12, %%ymm12\n\tvpabsw %%ymm12, %%ymm12\n\t"
               "1:\n\t"
               "vmovdqu (%[w]), %%ymm10\n\t"
               "vmovdqu 32(%[w]), %%ymm11\n\t" SIGN_ROW(0, 0, 1) SIGN_ROW(4, 2, 3) SIGN_ROW(8, 4, 5)
                   SIGN_ROW(12, 6, 7) "dec %[n]\n\tjnz 1b\n\t"
               : [n] "+r"(n)
               : [w] "r"(w_bytes), [a] "r"(a_pairs)
               : CLOBBER_ALL);
}

void run_fp32_fma_zmm(std::int64_t n) {
  asm volatile("vpxord %%zmm12, %%zmm12, %%zmm12\n\tvpxord %%zmm13, %%zmm13, %%zmm13\n\t"
               "1:\n\t" TWELVE(FMA_ZMM) "dec %[n]\n\tjnz 1b\n\tvzeroupper\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}
void run_vnni_dpbusd(std::int64_t n) {
  asm volatile("vpxord %%zmm12, %%zmm12, %%zmm12\n\tvpxord %%zmm13, %%zmm13, %%zmm13\n\t"
               "1:\n\t" TWELVE(DPBUSD) "dec %[n]\n\tjnz 1b\n\tvzeroupper\n\t"
               : [n] "+r"(n)
               :
               : CLOBBER_ALL);
}
void run_vnni_w8a8_step(std::int64_t n) {
  asm volatile("1:\n\t"
               "vmovdqu64 (%[w]), %%zmm12\n\t" VNNI_ROW(0, 0) VNNI_ROW(4, 1) VNNI_ROW(8, 2) VNNI_ROW(12, 3)
                   VNNI_ROW(16, 4) VNNI_ROW(20, 5) VNNI_ROW(24, 6) VNNI_ROW(28, 7) "dec %[n]\n\tjnz 1b\n\tvzeroupper\n\t"
               : [n] "+r"(n)
               : [w] "r"(w_bytes), [a] "r"(a_pairs)
               : CLOBBER_ALL);
}

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
}

double seconds_for(const Mix& mix, std::int64_t iterations) {
  const auto t0 = std::chrono::steady_clock::now();
  mix.run(iterations);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  int repeats = 7;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json") {
      json = true;
    } else if (arg == "--repeats" && i + 1 < argc) {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--json] [--repeats N]\n", argv[0]);
      return 2;
    }
  }
  std::memset(w_bytes, 1, sizeof w_bytes);
  for (auto& a : a_pairs) a = 0x00010001;
  std::vector<Mix> mixes = {
      {"fp32_fma", 12 * 8, run_fp32_fma},
      {"int16_madd", 12 * 16, run_int16_madd},
      {"int16_madd_add", 12 * 16, run_int16_madd_add},
      {"w8a8_kernel_step", 12 * 16, run_w8a8_kernel_step},
      {"u8s8_maddubs", 12 * 32, run_u8s8_maddubs},
      {"fbgemm_mix", 12 * 32, run_fbgemm_mix},
      {"sign_trick_step", 8 * 32, run_sign_trick_step},
  };
  if (cpu_has_avx512_vnni()) {
    mixes.push_back({"fp32_fma_zmm", 12 * 16, run_fp32_fma_zmm});
    mixes.push_back({"vnni_dpbusd", 12 * 64, run_vnni_dpbusd});
    mixes.push_back({"vnni_w8a8_step", 8 * 64, run_vnni_w8a8_step});
  } else if (!json) {
    std::printf("(no AVX-512 VNNI on this CPU: its mixes are skipped)\n");
  }
  // Iteration counts for ~0.2 s each; then the mixes take turns (round robin) so that a busy machine slows them
  // alike, and each mix's median is kept.
  const std::size_t n_mixes = mixes.size();
  std::vector<std::int64_t> iterations(n_mixes, 1 << 16);
  for (std::size_t i = 0; i < n_mixes; ++i) {
    while (seconds_for(mixes[i], iterations[i]) < 0.05) iterations[i] *= 2;
    iterations[i] = static_cast<std::int64_t>(iterations[i] * 0.2 / std::max(1e-9, seconds_for(mixes[i], iterations[i])));
  }
  std::vector<std::vector<double>> rates(n_mixes);
  for (int r = 0; r < repeats; ++r)
    for (std::size_t i = 0; i < n_mixes; ++i)
      rates[i].push_back(mixes[i].macs_per_iteration * static_cast<double>(iterations[i]) /
                         seconds_for(mixes[i], iterations[i]) / 1e9);
  std::vector<double> gmacs;
  for (auto& r : rates) {
    std::sort(r.begin(), r.end());
    gmacs.push_back(r[r.size() / 2]);
  }
  const double fp32 = gmacs[0];
  if (json) {
    std::printf("[");
    for (std::size_t i = 0; i < gmacs.size(); ++i)
      std::printf("%s{\"mix\": \"%s\", \"gmac_per_s\": %.2f, \"vs_fp32_fma\": %.3f}", i ? ", " : "", mixes[i].name,
                  gmacs[i], gmacs[i] / fp32);
    std::printf("]\n");
  } else {
    std::printf("per-core ceilings, one thread (median of %d runs)\n", repeats);
    std::printf("%-18s %12s %12s\n", "mix", "GMAC/s", "vs fp32 FMA");
    for (std::size_t i = 0; i < gmacs.size(); ++i)
      std::printf("%-18s %12.1f %11.2fx\n", mixes[i].name, gmacs[i], gmacs[i] / fp32);
  }
  return 0;
}

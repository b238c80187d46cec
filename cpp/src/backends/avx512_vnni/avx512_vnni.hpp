// The AVX-512 VNNI backend: the AVX2 backend's design with its integer products done by vpdpbusd (u8 x s8, four
// products added into each int32 lane, exact: no int16 intermediate). Its own weight layouts (a step of one 64-byte
// zmm: 16 columns x 4 k of int8 weights, 16 columns x 8 k of int4 weights), the AVX2 backend's activation
// quantization and fp32 epilogue (backends/avx2), so that both give the reference's bits.
//
// Its files are compiled with the AVX2 flags like backends/avx2; only the functions marked OSENGINE_AVX512_VNNI use
// AVX-512 (a function-level target). Inline and template code shared with other files (the std library, the AVX2
// helpers) is therefore compiled for AVX2 here too, so whichever copy the linker keeps runs on an AVX2-only CPU.
// Everything runs only after the CPU check in backends/registry.cpp (the table's available()).
#pragma once
#include "backends/kernels.hpp"

#define OSENGINE_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace osengine::detail {

void gemm_avx512_vnni(const GemmProblem& problem);  // avx512_vnni/gemm_w8.cpp or gemm_w4.cpp by the weights' bits
void gemm_w8_avx512_vnni(const GemmProblem& problem);
void gemm_w4_avx512_vnni(const GemmProblem& problem);
WeightLayout pack_weights_avx512_vnni(const std::int8_t* codes, std::int64_t n, std::int64_t k, int bits,
                                      std::int64_t group_size);  // avx512_vnni/pack.cpp
void unpack_weights_avx512_vnni(const PackedWeights& weights, const std::int32_t* rows, std::int64_t count,
                                std::int8_t* codes);

}  // namespace osengine::detail

// The runtime's RoPE and attention as standalone functions: what Context computes, in the same float order, so that
// other implementations of the model (the engine-backed transformers model, the integer-exact simulation) can use
// the same definition and agree with the runtime bit for bit (osengine.runtime.attention in Python).
#pragma once
#include <cstdint>

namespace osengine::runtime {

// inv_freq[i] = 1 / theta^(2i / head_dim) for i < head_dim / 2 (float32, std::pow).
void rope_inv_freq(float theta, std::int64_t head_dim, float* inv_freq);

// cos / sin [n, half] of positions[r] * inv_freq[i] (float32, std::cos / std::sin): the rotate-half RoPE's tables,
// x[i] -> x[i] c - x[i + half] s, x[i + half] -> x[i + half] c + x[i] s.
void rope_tables(const float* inv_freq, std::int64_t half, const std::int32_t* positions, std::int64_t n, float* cos,
                 float* sin);

// Causal attention of t queries over s >= t keys and values of one sequence, query i at position s - t + i (it sees
// keys 0 .. s - t + i), softmax(q . k / sqrt(head_dim)) v per head, query head h reading key/value head
// h / (n_head / n_head_kv) (GQA): q [t, n_head, head_dim], k and v [s, n_head_kv, head_dim], out [t, n_head, head_dim],
// all float32 row-major. The runtime's kernel (AVX2 where the CPU has it), one thread.
void causal_attention(const float* q, const float* k, const float* v, std::int64_t t, std::int64_t s,
                      std::int64_t n_head, std::int64_t n_head_kv, std::int64_t head_dim, float* out);

}  // namespace osengine::runtime

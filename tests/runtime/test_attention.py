"""osengine.runtime.attention: the native runtime's RoPE and attention inside transformers models (one definition
shared by the runtime, the engine-backed model and the integer-exact simulation)."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from osengine import _C
from osengine.runtime.attention import ATTENTION_NAME, use_runtime_attention


def tiny_llama(**overrides):
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("t, s", [(1, 1), (3, 3), (17, 17), (1, 17), (4, 9)])
def test_the_attention_kernel_is_causal_attention(t, s):
    rng = np.random.default_rng(t * 31 + s)
    q = rng.standard_normal((t, 6, 16), dtype=np.float32)
    k, v = rng.standard_normal((s, 2, 16), dtype=np.float32), rng.standard_normal((s, 2, 16), dtype=np.float32)
    got = _C.runtime_causal_attention(q, k, v)
    keep = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # query i at position s - t + i
    want = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q).transpose(0, 1), torch.from_numpy(k).transpose(0, 1).repeat_interleave(3, 0),
        torch.from_numpy(v).transpose(0, 1).repeat_interleave(3, 0), attn_mask=keep).transpose(0, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_rope_tables_are_cos_and_sin_of_the_angles():
    cos, sin = _C.runtime_rope_tables(10000.0, 16, np.arange(40))
    angles = np.arange(40, dtype=np.float32)[:, None] * (1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    np.testing.assert_allclose(cos, np.cos(angles.astype(np.float64)), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles.astype(np.float64)), atol=1e-6)


def test_bad_arguments_name_what_was_expected():
    q = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="kv_heads must divide"):
        _C.runtime_causal_attention(q, np.zeros((2, 3, 8), np.float32), np.zeros((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="at least as many keys"):
        _C.runtime_causal_attention(q, np.zeros((1, 2, 8), np.float32), np.zeros((1, 2, 8), np.float32))
    with pytest.raises(ValueError, match="head_dim"):
        _C.runtime_causal_attention(q, np.zeros((2, 2, 4), np.float32), np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="head_dim"):
        _C.runtime_rope_tables(10000.0, 7, np.arange(3))
    with pytest.raises(ValueError, match="theta"):
        _C.runtime_rope_tables(float("nan"), 8, np.arange(3))


def test_a_llama_computes_what_torch_computes_to_float_rounding():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert use_runtime_attention(model)
        assert model.config._attn_implementation == ATTENTION_NAME
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # cached generation: one query over the cache each step, the same tokens as a full pass would choose
        out = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
        full = model(input_ids=out[:, :-1]).logits[0, 7:].argmax(-1)
    assert torch.equal(out[0, 8:], full)


def test_what_the_runtime_does_not_implement_is_left_alone():
    scaled = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert not use_runtime_attention(scaled)
    opt = OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=64)).eval()
    assert not use_runtime_attention(opt)


def test_a_padded_batch_is_refused_with_the_reason():
    model = tiny_llama()
    use_runtime_attention(model)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="only the plain causal mask"):
        model(input_ids=ids, attention_mask=mask)

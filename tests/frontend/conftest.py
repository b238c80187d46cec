"""Tiny randomly initialised models of every built-in architecture, with outlier channels injected."""
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(min(2, os.cpu_count() or 1))

HIDDEN = 64
OUTLIERS = [3, 17, 40]


def _inject(model, kind):
    """Large, asymmetric LayerNorm bias / gamma on a few channels, as real OPT and BERT have; for RMSNorm a large
    gamma (and a few large up_proj rows so down_proj sees outliers too)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
                m.weight[OUTLIERS] = torch.tensor([12.0, -9.0, 15.0])
                if getattr(m, "bias", None) is not None:
                    m.bias[OUTLIERS] = torch.tensor([20.0, -6.0, 8.0])
            if name.endswith("up_proj"):
                m.weight[:4] *= 30.0
    return model


def make_model(kind, **overrides):
    torch.manual_seed(0)
    common = dict(hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=128, vocab_size=128,
                  max_position_embeddings=128)
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "opt":
        cfg = transformers.OPTConfig(num_hidden_layers=2, ffn_dim=128, word_embed_proj_dim=HIDDEN,
                                     **{k: v for k, v in common.items() if k != "intermediate_size"})
        model = transformers.OPTForCausalLM(cfg)
    elif kind == "bloom":
        cfg = transformers.BloomConfig(hidden_size=HIDDEN, n_head=4, n_layer=2, vocab_size=128)
        model = transformers.BloomForCausalLM(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, **common)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(model.config, k, v)
    return _inject(model.eval(), kind)


def model_output(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


ARCHS = ["llama", "qwen2", "opt", "bloom", "bert"]


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))

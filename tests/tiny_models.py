"""The tiny randomly initialised models the tests build, in one place: every built-in architecture, with outlier
channels injected as real models have them. Import after the tests' importorskip of torch and transformers."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HIDDEN = 64
OUTLIERS = [3, 17, 40]
ARCHS = ["llama", "qwen2", "opt", "bloom", "bert"]


def build(kind, *, hidden_size=HIDDEN, layers=2, vocab_size=128, **config):
    """A random `kind` model ("llama", "qwen2", "opt", "bloom", "bert") of `layers` blocks, eval mode, seeded;
    `config` overrides fields of its config (e.g. tie_word_embeddings, num_key_value_heads)."""
    torch.manual_seed(0)
    common = dict(hidden_size=hidden_size, num_attention_heads=4, vocab_size=vocab_size, max_position_embeddings=128)
    if kind in ("llama", "qwen2"):
        config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
        cfg = config_class(**{**common, "num_hidden_layers": layers, "num_key_value_heads": 2,
                              "intermediate_size": 2 * hidden_size, **config})
        model = model_class(cfg)
    elif kind == "opt":
        cfg = transformers.OPTConfig(**{**common, "num_hidden_layers": layers, "ffn_dim": 2 * hidden_size,
                                        "word_embed_proj_dim": hidden_size, **config})
        model = transformers.OPTForCausalLM(cfg)
    elif kind == "bloom":
        cfg = transformers.BloomConfig(**{"hidden_size": hidden_size, "n_head": 4, "n_layer": layers,
                                          "vocab_size": vocab_size, **config})
        model = transformers.BloomForCausalLM(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(**{**common, "num_hidden_layers": layers, "intermediate_size": 2 * hidden_size,
                                         **config})
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(kind)
    return model.eval()


def _norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


def inject_outliers(model, noise=True, up_rows=True):
    """Large, asymmetric LayerNorm bias / gamma on a few channels, as real OPT and BERT have; for RMSNorm a large
    gamma (and, with up_rows, a few large up_proj rows so down_proj sees outliers too)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in _norms(model):
            if noise:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
            m.weight[OUTLIERS] = torch.tensor([12.0, -9.0, 15.0])
            if getattr(m, "bias", None) is not None:
                m.bias[OUTLIERS] = torch.tensor([20.0, -6.0, 8.0])
        if up_rows:
            for name, m in model.named_modules():
                if name.endswith("up_proj"):
                    m.weight[:4] *= 30.0
    return model


def make_model(kind, **overrides):
    """The front-end tests' model: `kind` with outliers (noise, large up_proj rows); `overrides` set config fields
    after construction."""
    model = build(kind)
    for k, v in overrides.items():
        setattr(model.config, k, v)
    return inject_outliers(model)


def tiny_llama(tied=False, **config):
    """The deployment tests' LLaMA: two outlier channels in its RMSNorm weights only."""
    model = build("llama", tie_word_embeddings=tied, **config)
    with torch.no_grad():
        for m in _norms(model):
            m.weight[[3, 17]] = torch.tensor([12.0, -9.0])
    return model


def model_output(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tiny_llama_folder(root):
    """A tiny LLaMA with outlier channels and tied embeddings, saved as a Hugging Face folder with a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(tied=True, vocab_size=64, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model.save_pretrained(root / "base")
    fast.save_pretrained(root / "base")
    return root / "base"

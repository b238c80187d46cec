"""Models shared by the deployment tests (import after the tests' importorskip of torch and transformers)."""
import torch
import transformers


def tiny_llama(tied=False):
    """A 2-layer random LLaMA with outlier channels in its RMSNorm weights, as real models have."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   vocab_size=128, num_hidden_layers=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight[[3, 17]] = torch.tensor([12.0, -9.0])
    return model

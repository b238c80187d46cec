"""LLaMA family (also Mistral and Qwen2, whose block layout and names are the same): pre-RMSNorm decoder.

Sites: input_layernorm -> q,k,v (inspected: attention output before o_proj, with the model's RoPE, GQA and mask);
post_attention_layernorm -> gate,up (inspected: SiLU(gate) * up); gate*up -> down_proj (inspected: its output;
the scale is folded into the rows of up_proj, exact because SiLU(g) * (u / s) = (SiLU(g) * u) / s).
RMSNorm has no bias, so a shift can only be applied at run time (osplus shift=runtime).
"""
from osengine.plugin_api import Architecture, AttentionOutput, GatedOutput, LinearOutput, MigrationSite

from ._layers import find_layers


class Llama(Architecture):
    name = "llama"
    description = "LLaMA-family pre-RMSNorm decoders (llama, mistral, qwen2)"
    model_types = ("llama", "mistral", "qwen2")
    scale_search_min = 0.1
    smoothquant_alpha = 0.8

    def _layers(self, model):
        return find_layers(model, ("model.layers", "layers"), self.name)

    def blocks(self, model):
        path, layers = self._layers(model)
        return [f"{path}.{i}" for i in range(len(layers))]

    def sites(self, model, index):
        p = f"{self._layers(model)[0]}.{index}"
        act = model.get_submodule(f"{p}.mlp").act_fn
        return [
            MigrationSite("attn", f"{p}.input_layernorm", "rmsnorm",
                          [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
                          AttentionOutput(f"{p}.self_attn", before=f"{p}.self_attn.o_proj")),
            MigrationSite("mlp", f"{p}.post_attention_layernorm", "rmsnorm",
                          [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], GatedOutput(act)),
            MigrationSite("down", f"{p}.mlp.up_proj", "linear_rows", [f"{p}.mlp.down_proj"], LinearOutput()),
        ]

    def attention_modules(self, model):
        path, layers = self._layers(model)
        return [layer.self_attn for layer in layers]

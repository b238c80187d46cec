"""LLaMA family (also Mistral and Qwen2, whose block layout and names are the same): pre-RMSNorm decoder.

Sites: input_layernorm -> q,k,v (inspected: attention output before o_proj, with the model's RoPE, GQA and mask);
post_attention_layernorm -> gate,up (inspected: SiLU(gate) * up); gate*up -> down_proj (inspected: its output;
the scale is folded into the rows of up_proj, exact because SiLU(g) * (u / s) = (SiLU(g) * u) / s).
RMSNorm has no bias, so a shift can only be applied at run time (osplus shift=runtime).
"""
from osengine.plugin_api import (
    Architecture,
    AttentionOutput,
    GatedMLP,
    GatedOutput,
    LinearOutput,
    MigrationSite,
    NormReaders,
    RotationLayout,
)


class Llama(Architecture):
    name = "llama"
    description = "LLaMA-family pre-RMSNorm decoders (llama, mistral, qwen2)"
    model_types = ("llama", "mistral", "qwen2")
    layers = ("model.layers", "layers")
    scale_search_min = 0.1
    smoothquant_alpha = 0.8
    rmsnorm_eps_attribute = "variance_epsilon"   # LlamaRMSNorm / MistralRMSNorm / Qwen2RMSNorm: fp32, weight * (x * r)
    gated_mlp = GatedMLP(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="act_fn")
    bias_flags = ("attention_bias", "mlp_bias")
    runtime_attention = True

    def sites(self, model, index):
        p = self.block(model, index)
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
        return [layer.self_attn for layer in self.layer_list(model)[1]]

    def rotation_layout(self, model):
        prefix = "model." if hasattr(model, "model") else ""
        return RotationLayout(
            embeddings=(f"{prefix}embed_tokens",), final_norm=f"{prefix}norm",
            lm_head="lm_head" if hasattr(model, "lm_head") else None,
            norms=(NormReaders("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                   NormReaders("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
            writers=("self_attn.o_proj", "mlp.down_proj"), value_output=("self_attn.v_proj", "self_attn.o_proj"),
            online=("mlp.down_proj",), online_attention="self_attn.o_proj")

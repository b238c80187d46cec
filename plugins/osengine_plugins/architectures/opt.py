"""OPT: pre-LayerNorm decoder (all sizes except 350m, whose post-LN layout is rejected).

Sites: self_attn_layer_norm -> q,k,v (inspected: attention output before out_proj, with the causal mask);
final_layer_norm -> fc1 (inspected: fc1 pre-activation). out_proj and fc2 are left alone.
"""
from osengine.plugin_api import (
    Architecture,
    AttentionOutput,
    LinearOutput,
    MigrationSite,
    NormReaders,
    PluginError,
    RotationLayout,
)


class OPT(Architecture):
    name = "opt"
    description = "OPT pre-LayerNorm decoders"
    model_types = ("opt",)
    layers = ("model.decoder.layers", "decoder.layers")
    scale_search_min = 1.0
    smoothquant_alpha = 0.5

    def layer_list(self, model):
        if not getattr(model.config, "do_layer_norm_before", True):
            raise PluginError("opt: models with do_layer_norm_before=False (OPT-350m) are not supported")
        return super().layer_list(model)

    def sites(self, model, index):
        p = self.block(model, index)
        return [
            MigrationSite("attn", f"{p}.self_attn_layer_norm", "layernorm",
                          [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
                          AttentionOutput(f"{p}.self_attn", before=f"{p}.self_attn.out_proj")),
            MigrationSite("fc1", f"{p}.final_layer_norm", "layernorm", [f"{p}.fc1"], LinearOutput()),
        ]

    def attention_modules(self, model):
        return [layer.self_attn for layer in self.layer_list(model)[1]]

    def rotation_layout(self, model):
        prefix = "model.decoder." if hasattr(model, "model") else "decoder."
        return RotationLayout(
            embeddings=(f"{prefix}embed_tokens", f"{prefix}embed_positions"), final_norm=f"{prefix}final_layer_norm",
            lm_head="lm_head" if hasattr(model, "lm_head") else None,
            norms=(NormReaders("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                   NormReaders("final_layer_norm", ("fc1",))),
            writers=("self_attn.out_proj", "fc2"), value_output=("self_attn.v_proj", "self_attn.out_proj"),
            online=("fc2",), online_attention="self_attn.out_proj", centered=True)

"""BLOOM: pre-LayerNorm decoder with ALiBi and a fused query_key_value.

Sites: input_layernorm -> query_key_value (inspected: attention output before dense, with ALiBi and the mask);
post_attention_layernorm -> dense_h_to_4h (inspected: pre-activation). With
apply_residual_connection_post_layernorm the residual is the LayerNorm output, restored as X' * s + z.
BMM-input quantization is not available (BLOOM does not use transformers' attention interface).
"""
from osengine.plugin_api import Architecture, AttentionOutput, LinearOutput, MigrationSite


class Bloom(Architecture):
    name = "bloom"
    description = "BLOOM pre-LayerNorm decoders (ALiBi)"
    model_types = ("bloom",)
    layers = ("transformer.h", "h")
    scale_search_min = 1.0
    smoothquant_alpha = 0.5

    def sites(self, model, index):
        p = self.block(model, index)
        post_ln = bool(getattr(model.config, "apply_residual_connection_post_layernorm", False))
        return [
            MigrationSite("attn", f"{p}.input_layernorm", "layernorm", [f"{p}.self_attention.query_key_value"],
                          AttentionOutput(f"{p}.self_attention", before=f"{p}.self_attention.dense"),
                          residual=f"{p}.self_attention" if post_ln else None),
            MigrationSite("mlp", f"{p}.post_attention_layernorm", "layernorm", [f"{p}.mlp.dense_h_to_4h"],
                          LinearOutput(), residual=f"{p}.mlp" if post_ln else None),
        ]

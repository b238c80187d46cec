"""OPT: pre-LayerNorm decoder (all sizes except 350m, whose post-LN layout is rejected).

Sites: self_attn_layer_norm -> q,k,v (inspected: attention output before out_proj, with the causal mask);
final_layer_norm -> fc1 (inspected: fc1 pre-activation). out_proj and fc2 are left alone.
"""
from osengine.plugin_api import Architecture, AttentionOutput, LinearOutput, MigrationSite, PluginError


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

"""BERT: post-LayerNorm encoder (BertModel and the task heads built on it, e.g. all-MiniLM-L6-v2).

Sites of block i: the LayerNorm before it (embeddings.LayerNorm for block 0, else block i-1's output.LayerNorm)
-> query,key,value (inspected: attention output before attention.output.dense); attention.output.LayerNorm ->
intermediate.dense (inspected: pre-activation). The LayerNorm output is also the residual of the next Add & Norm,
which restores it as X' * s + z (a small runtime cost).
"""
from osengine.plugin_api import Architecture, AttentionOutput, LinearOutput, MigrationSite, PluginError


class Bert(Architecture):
    name = "bert"
    description = "BERT post-LayerNorm encoders"
    model_types = ("bert",)
    layers = ("encoder.layer", "bert.encoder.layer")
    scale_search_min = 1.0
    smoothquant_alpha = 0.5

    def sites(self, model, index):
        path = self.layer_list(model)[0]
        p = f"{path}.{index}"
        embeddings = path.replace("encoder.layer", "embeddings")
        before = f"{embeddings}.LayerNorm" if index == 0 else f"{path}.{index - 1}.output.LayerNorm"
        return [
            MigrationSite("attn", before, "layernorm",
                          [f"{p}.attention.self.query", f"{p}.attention.self.key", f"{p}.attention.self.value"],
                          AttentionOutput(f"{p}.attention.self"), residual=f"{p}.attention.output",
                          block_input=True),
            MigrationSite("ffn", f"{p}.attention.output.LayerNorm", "layernorm", [f"{p}.intermediate.dense"],
                          LinearOutput(), residual=f"{p}.output"),
        ]

    def attention_modules(self, model):
        return [layer.attention.self for layer in self.layer_list(model)[1]]

    def rotation_layout(self, model):
        raise PluginError("strategy rotate: BERT is post-LayerNorm — each LayerNorm (with its per-channel weight and "
                          "bias) acts on the residual stream itself, not on a branch, so no rotation of the stream "
                          "can pass through it and nothing can absorb the inverse; rotations need pre-norm models "
                          "(llama, mistral, qwen2, opt)")

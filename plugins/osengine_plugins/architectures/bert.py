"""BERT: post-LayerNorm encoder (BertModel and the task heads built on it, e.g. all-MiniLM-L6-v2).

Sites of block i: the LayerNorm before it (embeddings.LayerNorm for block 0, else block i-1's output.LayerNorm)
-> query,key,value (inspected: attention output before attention.output.dense); attention.output.LayerNorm ->
intermediate.dense (inspected: pre-activation). The LayerNorm output is also the residual of the next Add & Norm,
which restores it as X' * s + z (a small runtime cost).
"""
from osengine.plugin_api import Architecture, AttentionOutput, LinearOutput, MigrationSite

from ._layers import find_layers


class Bert(Architecture):
    name = "bert"
    description = "BERT post-LayerNorm encoders"
    model_types = ("bert",)
    scale_search_min = 1.0
    smoothquant_alpha = 0.5

    def _layers(self, model):
        return find_layers(model, ("encoder.layer", "bert.encoder.layer"), self.name)

    def blocks(self, model):
        path, layers = self._layers(model)
        return [f"{path}.{i}" for i in range(len(layers))]

    def sites(self, model, index):
        path = self._layers(model)[0]
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
        return [layer.attention.self for layer in self._layers(model)[1]]

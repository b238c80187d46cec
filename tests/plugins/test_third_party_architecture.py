"""An architecture the project does not ship, added as one plugin file + one entry point (an installed distribution),
with no edit of the core: calibration, the engine model's fusion and folded prologues, the integer-exact check and
the compressed-tensors export all read what the plugin declares. A plugin written against the earlier API (its own
blocks(), imports from osengine.plugin_api only, no declared facts) keeps working, without the folded prologues."""
import copy
import json
import textwrap

import pytest

safetensors_torch = pytest.importorskip("safetensors.torch")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import osengine
from osengine.io.export import ExportError, export_compressed_tensors
from osengine.plugins.registry import architectures
from osengine.quant.layers import set_integer_exact
from osengine.runtime.convert import convert_to_engine
from osengine.runtime.linear import EngineLinear
from osengine.runtime.simulate import simulate_folded_prologues

from tiny_models import tiny_llama

# A LLaMA whose MLP linears carry Meta's names (w1 = gate, w3 = up, w2 = down) and whose activation is `act`: nothing
# in the core knows these names.
TOY_PLUGIN = '''
from osengine.plugin_api import Architecture, AttentionOutput, GatedMLP, GatedOutput, LinearOutput, MigrationSite


class ToyLlama(Architecture):
    name = "toyllama"
    description = "a LLaMA with w1/w2/w3 MLP names"
    model_types = ("toyllama",)
    layers = ("model.layers",)
    scale_search_min = 0.1
    smoothquant_alpha = 0.8
    rmsnorm_eps_attribute = "variance_epsilon"
    gated_mlp = GatedMLP(module="mlp", gate="w1", up="w3", down="w2", activation="act")
    bias_flags = ("attention_bias", "mlp_bias")

    def sites(self, model, index):
        p = self.block(model, index)
        attn = [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"]
        return [
            MigrationSite("attn", f"{p}.input_layernorm", "rmsnorm", attn,
                          AttentionOutput(f"{p}.self_attn", before=f"{p}.self_attn.o_proj")),
            MigrationSite("mlp", f"{p}.post_attention_layernorm", "rmsnorm", [f"{p}.mlp.w1", f"{p}.mlp.w3"],
                          GatedOutput(model.get_submodule(f"{p}.mlp").act)),
            MigrationSite("down", f"{p}.mlp.w3", "linear_rows", [f"{p}.mlp.w2"], LinearOutput()),
        ]
'''

# Written against the API before the redesign: blocks() by hand, a helper of its own, no declared facts.
OLD_STYLE_PLUGIN = '''
from osengine.plugin_api import Architecture, AttentionOutput, GatedOutput, LinearOutput, MigrationSite, PluginError


class OldLlama(Architecture):
    name = "oldllama"
    description = "a LLaMA plugin in the pre-redesign style"
    model_types = ("oldllama",)
    scale_search_min = 0.1

    def _layers(self, model):
        try:
            return "model.layers", model.get_submodule("model.layers")
        except AttributeError:
            raise PluginError("oldllama: no model.layers") from None

    def blocks(self, model):
        path, layers = self._layers(model)
        return [f"{path}.{i}" for i in range(len(layers))]

    def sites(self, model, index):
        p = f"{self._layers(model)[0]}.{index}"
        return [
            MigrationSite("attn", f"{p}.input_layernorm", "rmsnorm",
                          [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
                          AttentionOutput(f"{p}.self_attn", before=f"{p}.self_attn.o_proj")),
            MigrationSite("mlp", f"{p}.post_attention_layernorm", "rmsnorm",
                          [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
                          GatedOutput(model.get_submodule(f"{p}.mlp").act_fn)),
            MigrationSite("down", f"{p}.mlp.up_proj", "linear_rows", [f"{p}.mlp.down_proj"], LinearOutput()),
        ]
'''


class MetaNamedMLP(torch.nn.Module):
    """The same MLP as LlamaMLP, with other attribute names."""

    def __init__(self, mlp):
        super().__init__()
        self.w1, self.w3, self.w2, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, torch.nn.SiLU()

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def install_plugin(tmp_path, monkeypatch, module, source, entry):
    """What `pip install` of a plugin distribution leaves on sys.path: the module and a dist-info with its entry
    point in the osengine.architectures group."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[osengine.architectures]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    architectures.refresh()


@pytest.fixture
def clean_registry():
    yield
    architectures.refresh()


CALIBRATION = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(6))


def quantized(model):
    osengine.quantize(model, recipe="w8a8-static", strategy="osplus", calibration=CALIBRATION, progress=False)
    return model


def engine_and_simulation(model):
    simulation = copy.deepcopy(model)
    engine = convert_to_engine(model)
    set_integer_exact(simulation)
    simulate_folded_prologues(simulation, engine)
    return engine, simulation


def test_a_new_architecture_gets_fusion_and_folded_prologues(tmp_path, monkeypatch, clean_registry):
    install_plugin(tmp_path, monkeypatch, "toyllama_plugin", TOY_PLUGIN, "toyllama = toyllama_plugin:ToyLlama")
    model = tiny_llama()
    model.config.model_type = "toyllama"
    for layer in model.model.layers:
        layer.mlp = MetaNamedMLP(layer.mlp)
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    quantized(model)
    report = model.osengine_report
    assert report["architecture"] == "toyllama"
    assert [e["site"] for e in report["sites"]] == ["attn", "mlp", "down"] * 2
    with torch.no_grad():
        fake_quant = model(input_ids=IDS).logits
    assert (fake_quant - reference).abs().max() / reference.abs().max() < 0.1

    engine, simulation = engine_and_simulation(model)
    members = [m for m in engine.modules() if isinstance(m, EngineLinear) and m.group is not None]
    groups = {id(m.group): m.group for m in members}
    assert len(groups) == 4    # q/k/v and w1/w3 in each of the two blocks
    assert sum(g.layer.prologue.rms_norm is not None for g in groups.values()) == 4
    downs = [layer.mlp.w2 for layer in engine.model.layers]
    assert all(d.prologue.silu_gate for d in downs)
    with torch.no_grad():
        assert torch.equal(engine(input_ids=IDS).logits, simulation(input_ids=IDS).logits)


def test_a_plugin_without_declared_facts_still_runs_unfolded(tmp_path, monkeypatch, clean_registry):
    install_plugin(tmp_path, monkeypatch, "oldllama_plugin", OLD_STYLE_PLUGIN, "oldllama = oldllama_plugin:OldLlama")
    model = tiny_llama()
    model.config.model_type = "oldllama"
    quantized(model)
    assert model.osengine_report["architecture"] == "oldllama"
    engine, simulation = engine_and_simulation(model)
    members = [m for m in engine.modules() if isinstance(m, EngineLinear) and m.group is not None]
    assert len({id(m.group) for m in members}) == 4      # the sites still say which linears share an input
    assert not any(m.prologue.rms_norm or m.prologue.silu_gate for m in engine.modules()
                   if isinstance(m, EngineLinear))         # nothing declared foldable: nothing folded
    with torch.no_grad():
        assert torch.equal(engine(input_ids=IDS).logits, simulation(input_ids=IDS).logits)


def biased(model_type):
    """A LLaMA with biases on q/k/v and up only (as some fine-tunes have), of another model type."""
    model = tiny_llama()
    model.config.model_type = model_type
    model.config.architectures = ["LlamaForCausalLM"]
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
                lin.bias = torch.nn.Parameter(0.5 * torch.randn(lin.out_features))
    return model


def test_the_export_reads_fused_groups_and_bias_flags_from_the_plugin(tmp_path, monkeypatch, clean_registry):
    # the same plugin for a LLaMA with the standard names (transformers must rebuild the exported model)
    install_plugin(tmp_path, monkeypatch, "toyllama_std_plugin", TOY_PLUGIN.replace('"w1"', '"gate_proj"').replace(
        '"w3"', '"up_proj"').replace('"w2"', '"down_proj"').replace('"act"', '"act_fn"').replace(
        ".mlp.w1", ".mlp.gate_proj").replace(".mlp.w3", ".mlp.up_proj").replace(".mlp.w2", ".mlp.down_proj").replace(
        ").act)", ").act_fn)"), "toyllama = toyllama_std_plugin:ToyLlama")
    model = quantized(biased("toyllama"))
    summary = export_compressed_tensors(model, None, tmp_path / "ct")
    assert summary["bias_flags_set"] == ["attention_bias", "mlp_bias"]   # the plugin's bias_flags
    assert summary["zero_biases"] == 2 * 3                                # o_proj, gate_proj, down_proj per block
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    tensors = safetensors_torch.load_file(str(tmp_path / "ct" / "model.safetensors"))
    for block in range(2):
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
            scales = {float(tensors[f"model.layers.{block}.{name}.input_scale"]) for name in group}
            assert len(scales) == 1     # one input scale per fused group, as vLLM needs


def test_without_declared_bias_flags_the_export_refuses_clearly(tmp_path, monkeypatch, clean_registry):
    install_plugin(tmp_path, monkeypatch, "oldllama_plugin", OLD_STYLE_PLUGIN, "oldllama = oldllama_plugin:OldLlama")
    model = quantized(biased("oldllama"))
    with pytest.raises(ExportError, match="has no place for"):
        export_compressed_tensors(model, None, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()

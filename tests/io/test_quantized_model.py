"""A quantized folder stores the quantized linears' weights as integer codes and scales (format version 2): the
reload is bit-exact, a weight off its grid stays in floating point, version 1 folders still load, and broken codes
give clear errors."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file

import osengine
from osengine.io.checkpoint import FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, CheckpointError, write_manifest
from osengine.io.quantized_model import save_quantized, weights_from_codes

from tiny_models import build

W4A8_GROUPED = {"name": "w4a8-group16", "weights": {"bits": 4, "symmetric": True, "granularity": "per-group",
                                                 "group_size": 16},
                "activations": {"bits": 8, "symmetric": True, "granularity": "per-token", "dynamic": True}}


@pytest.mark.parametrize("recipe", ["w8a8-static", "w4a8", W4A8_GROUPED], ids=["w8a8-static", "w4a8", "w4a8-group"])
def test_codes_are_stored_and_reload_exactly(tmp_path, recipe):
    model = build("llama", hidden_size=32, layers=1, vocab_size=40, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64)
    calib = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    model = osengine.quantize(model, recipe=recipe, strategy="minmax", calibration=calib, n_samples=2, seq_len=16,
                              out=tmp_path / "q", progress=False)
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 4
    tensors = load_file(str(tmp_path / "q" / TENSORS_FILE))
    layers = manifest["layers"]
    assert len(layers) == 7  # q, k, v, o, gate, up, down
    bits = manifest["recipe"]["weights"]["bits"]
    for name, entry in layers.items():
        assert entry["weight_storage"] == "codes"
        assert f"{name}.weight" not in tensors
        codes, scale = tensors[f"{name}.weight_codes"], tensors[f"{name}.weight_scale"]
        assert codes.dtype == torch.int8 and scale.dtype == torch.float32
        assert int(codes.abs().max()) == 2 ** (bits - 1) - 1
        assert torch.equal(weights_from_codes(codes, scale, entry["weight"]), model.get_submodule(name).weight)
    reloaded, _ = osengine.load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib).logits, reloaded(input_ids=calib).logits)


def _quantize_in_memory(tmp_path):
    model = build("llama", hidden_size=32, layers=1, vocab_size=40, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64)
    calib = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    return osengine.quantize(model, recipe="w8a8-static", strategy="minmax", calibration=calib, n_samples=2,
                             seq_len=16, out=tmp_path / "q", progress=False), calib


def test_a_weight_off_its_grid_stays_in_floating_point(tmp_path):
    model, calib = _quantize_in_memory(tmp_path)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    with torch.no_grad():
        layer.weight[0, 0] = torch.nextafter(layer.weight[0, 0], torch.tensor(1.0))
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    kept = {k: manifest[k] for k in ("recipe", "strategy", "residual_restores", "residual_channels",
                                     "linears_with_added_bias", "runtime_shifted_linears") if k in manifest}
    save_quantized(model, None, tmp_path / "q2", kept)
    saved = json.loads((tmp_path / "q2" / MANIFEST_FILE).read_text())
    assert saved["layers"]["model.layers.0.mlp.up_proj"]["weight_storage"] == "float"
    assert saved["layers"]["model.layers.0.mlp.down_proj"]["weight_storage"] == "codes"
    reloaded, _ = osengine.load_model(tmp_path / "q2")
    assert torch.equal(reloaded.get_submodule("model.layers.0.mlp.up_proj").weight, layer.weight)
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib).logits, reloaded(input_ids=calib).logits)


def _rewrite(folder, edit_tensors, edit_manifest=None):
    tensors = load_file(str(folder / TENSORS_FILE))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edit_tensors(tensors, manifest)
    if edit_manifest:
        edit_manifest(manifest)
    manifest["tensors"] = {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                           for n, t in tensors.items()}
    manifest.pop("tensors_sha256", None)   # a hand-edited folder: the checks behind the digest are under test
    save_file(tensors, str(folder / TENSORS_FILE))
    write_manifest(folder, manifest)


def _to_version_1(tensors, manifest):
    """A format-2 folder's tensors and manifest as format 1 wrote them: every weight in floating point."""
    for name, entry in manifest["layers"].items():
        codes, scale = tensors.pop(f"{name}.weight_codes"), tensors.pop(f"{name}.weight_scale")
        tensors[f"{name}.weight"] = weights_from_codes(codes, scale, entry["weight"])
        del entry["weight_storage"]
    manifest["format_version"] = 1


def test_version_1_folders_still_load(tmp_path):
    model, calib = _quantize_in_memory(tmp_path)
    _rewrite(tmp_path / "q", _to_version_1)
    reloaded, _ = osengine.load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib).logits, reloaded(input_ids=calib).logits)


@pytest.mark.parametrize("damage, message", [
    ("out_of_range", r"has weight codes outside \[-127, 127\]"),
    ("missing_scale", r"weight_codes or .*weight_scale is missing"),
    ("wrong_scale_shape", r"needs int8 codes \[out, in\] and float32 scales \[64\]"),
    ("non_finite_scale", "has non-finite weight scales"),
])
def test_broken_codes_give_clear_errors(tmp_path, damage, message):
    _quantize_in_memory(tmp_path)
    name = "model.layers.0.mlp.up_proj"

    def edit(tensors, manifest):
        if damage == "out_of_range":
            tensors[f"{name}.weight_codes"][0, 0] = -128
        elif damage == "missing_scale":
            del tensors[f"{name}.weight_scale"]
        elif damage == "wrong_scale_shape":
            tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"][:5].clone()
        else:
            tensors[f"{name}.weight_scale"][2] = float("nan")

    _rewrite(tmp_path / "q", edit)
    with pytest.raises(CheckpointError, match=message):
        osengine.load_model(tmp_path / "q")


def test_upgrade_rewrites_a_version_1_folder_in_the_current_format(tmp_path):
    from osengine.io.quantized_model import upgrade_quantized

    model, calib = _quantize_in_memory(tmp_path)

    def to_version_1_with_a_record(tensors, manifest):
        _to_version_1(tensors, manifest)
        tensors["osengine.migrations.0.attn.scale"] = torch.ones(32)

    _rewrite(tmp_path / "q", to_version_1_with_a_record)
    (tmp_path / "q" / "report.md").write_text("the report")
    upgrade_quantized(tmp_path / "q", tmp_path / "q2")
    manifest = json.loads((tmp_path / "q2" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["strategy"] == "minmax"
    assert all(entry["weight_storage"] == "codes" for entry in manifest["layers"].values())
    assert "osengine.migrations.0.attn.scale" in manifest["tensors"]
    assert (tmp_path / "q2" / "report.md").read_text() == "the report"
    reloaded, _ = osengine.load_model(tmp_path / "q2")
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib).logits, reloaded(input_ids=calib).logits)
    with pytest.raises(FileExistsError):
        upgrade_quantized(tmp_path / "q", tmp_path / "q2")
    from osengine.cli.main import main
    assert main(["upgrade", str(tmp_path / "q"), "--out", str(tmp_path / "q3")]) == 0
    assert json.loads((tmp_path / "q3" / MANIFEST_FILE).read_text())["format_version"] == FORMAT_VERSION

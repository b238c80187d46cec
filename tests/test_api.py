"""osengine.load: a saved quantized folder rebuilt as an engine-backed model, from the folder alone."""
import copy
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import osengine
from osengine.io.checkpoint import MANIFEST_FILE, TENSORS_FILE, CheckpointError, write_manifest
from osengine.quant.layers import set_integer_exact
from osengine.runtime.linear import EngineLinear
from osengine.runtime.simulate import simulate_folded_prologues

from tiny_models import build, tiny_llama_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    base = tiny_llama_folder(root)
    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    model = osengine.quantize(str(base), recipe="w8a8-static", strategy="osplus", calibration=calib,
                              n_samples=4, seq_len=32, out=root / "q", strategy_options={"max_grid_steps": 10},
                              progress=False)
    return root, model


def test_folder_is_self_contained_and_complete(saved, tmp_path):
    root, model = saved
    copy = tmp_path / "q"
    shutil.copytree(root / "q", copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "fake-quant" and manifest["strategy"] == "osplus"
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}  # stored once
    q_proj = manifest["layers"]["model.layers.0.self_attn.q_proj"]
    assert q_proj["weight"]["bits"] == 8 and q_proj["activation"]["granularity"] == "per-tensor"
    assert q_proj["activation_step"] > 0 and "activation_range" in q_proj
    assert any(k.startswith("osengine.migrations.0.attn.scale") for k in manifest["tensors"])
    assert (copy / "config.json").is_file() and (copy / "tokenizer.json").is_file()
    # the base model is not needed to rebuild it
    reloaded, tokenizer = osengine.load_model(copy)
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    assert tokenizer is not None
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_load_runs_on_the_engine_and_matches_fake_quant(saved):
    root, model = saved
    engine_model, tokenizer = osengine.load(root / "q")
    linears = [m for m in engine_model.modules() if isinstance(m, EngineLinear)]
    assert len(linears) == 2 * 7  # every decoder linear; lm_head and embeddings stay in floating point
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    prompt = torch.tensor([[1, 5, 9, 13]])
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, engine_model(input_ids=ids).logits
        # Against the float simulation: the same up to float rounding, except at positions where a float-level
        # difference flips an activation code at a rounding boundary (static ranges turn 1 ulp into one step).
        per_position = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert (per_position < 1e-4).float().mean().item() >= 0.9
        assert ((got - want).norm() / want.norm()).item() < 1e-2
        assert torch.equal(engine_model.generate(prompt, **gen), model.generate(prompt, **gen))
        # Against the integer-exact simulation (the engine's own float operations, in torch): bit for bit.
        exact = copy.deepcopy(model)
        set_integer_exact(exact)
        simulate_folded_prologues(exact, engine_model)
        assert torch.equal(exact(input_ids=ids).logits, got)


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8-token"])
def test_gptq_weights_and_a_quantile_runtime_shift_reload_and_run_on_the_engine(tmp_path, recipe):
    # GPTQ's codes are read back from the saved values, and the runtime shift rides the engine's shift-add:
    # the reloaded fake quant is identical, the engine bit for bit the integer-exact simulation.
    base = tiny_llama_folder(tmp_path)
    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    options = {"max_grid_steps": 10, "shift": "runtime", "shift_quantile": 0.01, "shift_sites": "attn,mlp"}
    model = osengine.quantize(str(base), recipe=recipe, strategy="osplus", calibration=calib, n_samples=4,
                              seq_len=32, out=tmp_path / "q", strategy_options=options, weight_rounding="gptq",
                              progress=False)
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    assert manifest["recipe"]["weights"]["rounding"] == "gptq"
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["runtime_shift"]
    assert not manifest["layers"]["model.layers.0.mlp.down_proj"]["runtime_shift"]
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    reloaded, _ = osengine.load_model(tmp_path / "q")
    engine_model, _ = osengine.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        exact = copy.deepcopy(model)
        set_integer_exact(exact)
        simulate_folded_prologues(exact, engine_model)
        assert torch.equal(exact(input_ids=ids).logits, engine_model(input_ids=ids).logits)


def test_save_refuses_an_existing_folder_before_calibrating(saved):
    root, _ = saved
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        osengine.quantize(str(root / "base"), recipe="w8a8-static", strategy="minmax", calibration="not-used",
                          out=root / "q", progress=False)


def test_broken_folders_give_clear_errors(saved, tmp_path):
    root, _ = saved
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "q", truncated)
    data = (truncated / TENSORS_FILE).read_bytes()
    (truncated / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        osengine.load(truncated)

    newer = tmp_path / "newer"
    shutil.copytree(root / "q", newer)
    manifest = json.loads((newer / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    write_manifest(newer, manifest)
    with pytest.raises(CheckpointError, match="newer than this osengine supports"):
        osengine.load(newer)

    no_config = tmp_path / "no_config"
    shutil.copytree(root / "q", no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        osengine.load(no_config)

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(root / "q", wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] = 96  # the tensors no longer fit the model the config describes
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit the model"):
        osengine.load(wrong_shape)


def test_in_memory_module_without_architectures_reloads_as_its_class(tmp_path):
    model = build("llama", hidden_size=32, layers=1, vocab_size=40, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64)
    assert not model.config.architectures
    calib = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    osengine.quantize(model, recipe="w8a8-static", strategy="minmax", calibration=calib, n_samples=2, seq_len=16,
                      out=tmp_path / "q", progress=False)
    reloaded, tokenizer = osengine.load_model(tmp_path / "q")
    assert type(reloaded).__name__ == "LlamaForCausalLM" and tokenizer is None
    ids = calib[:1]
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_check_finds_the_engine_and_the_integer_exact_simulation_identical(saved, capsys):
    from osengine.cli import main

    root, _ = saved
    for backend in ("auto", "reference"):
        assert main(["check", str(root / "q"), "--prompt", "w1 w2 w3 w4", "--new-tokens", "8",
                     "--backend", backend, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["logits_identical"] and result["tokens_identical"] and result["logits_max_abs_diff"] == 0
        assert result["positions"] == 12 and result["first_token_difference"] is None


def test_check_reports_a_difference(saved, capsys, monkeypatch):
    # A simulated SiLU 0.1% off stands in for a kernel that computes something else than the simulation.
    from osengine.cli import main
    from osengine.runtime import simulate

    root, _ = saved
    monkeypatch.setattr(simulate, "engine_silu", lambda x: torch.nn.functional.silu(x) * 1.001)
    assert main(["check", str(root / "q"), "--prompt", "w1 w2 w3 w4", "--new-tokens", "8"]) == 1
    assert "DIFFER: logits max abs difference" in capsys.readouterr().out

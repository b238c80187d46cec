"""Quantization-aware training (train/qat.py, api.train_qat): the quantizers are the engine's, the kurtosis term is
the paper's, the loss falls, an interrupted run resumes to the same weights, and the result is a quantized folder
that runs on the engine."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from osengine import api
from osengine.cli.main import main as cli_main
from osengine.io.checkpoint import MANIFEST_FILE
from osengine.quant.spec import QuantSpec, fake_quant, qparams_from_range
from osengine.train.qat import (
    QATConfig,
    QATError,
    batch_for_step,
    latest_state,
    static_fake_quant,
    token_kurtosis_sum,
    train,
)

from strategy_testing import engine_matches_simulation
from tiny_models import build, tiny_llama, tiny_llama_folder


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_static_quantizer_is_the_engines_and_passes_gradients_to_its_range(symmetric, bits):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="per-tensor")
    x = (torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    lo, hi = torch.tensor(-2.5, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    out = static_fake_quant(x, lo, hi, spec)
    delta, zp = qparams_from_range(lo.detach(), hi.detach(), spec)
    assert torch.equal(out.detach(), fake_quant(x.detach(), delta, zp, spec))
    out.sum().backward()
    assert float(hi.grad) != 0.0 and (symmetric or float(lo.grad) != 0.0)
    if not symmetric:   # straight through where the code is not clamped, nothing for the clipped values
        code = torch.round(x.detach() / delta) + zp
        inside = (code >= spec.qmin) & (code <= spec.qmax)
        assert inside.any() and (~inside).any()
        assert torch.all(x.grad[inside] == 1.0) and torch.all(x.grad[~inside] == 0.0)


def test_kurtosis_term_is_the_papers():
    out = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 9.0, 32)
    o = out.reshape(-1, 32).double().numpy()
    centred = o - o.mean(axis=1, keepdims=True)
    sigma = np.sqrt((centred ** 2).mean(axis=1, keepdims=True))
    want = ((centred / (sigma + 1e-6)) ** 4).mean(axis=1).sum()
    assert float(token_kurtosis_sum(out)) == pytest.approx(want, rel=1e-5)
    # a token with one outlier channel has a large kurtosis, a flat one about 1.8 (uniform)
    spiky = torch.zeros(1, 100)
    spiky[0, 3] = 50.0
    assert float(token_kurtosis_sum(spiky)) > 90 and float(token_kurtosis_sum(torch.linspace(-1, 1, 100)[None])) < 2


def _windows(n=12, seq_len=16, vocab=64):
    """Learnable training data: a fixed cycle of token ids, from different starting points."""
    cycle = torch.arange(3, 3 + 20)
    return torch.stack([cycle.roll(-i).repeat(2)[:seq_len] for i in range(n)]) % vocab


def _train(tmp_path, recipe="w8a8-static", steps=8, **kw):
    from osengine.quant.recipes import load_recipe

    model = tiny_llama(vocab_size=64)
    blocks = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    config = QATConfig(steps=steps, batch_size=4, seq_len=16, lr=1e-3, range_lr=1e-2, warmup_steps=2,
                       save_every=2, kurtosis_weight=1e-5)
    ranges, history = train(model, blocks, load_recipe(recipe), _windows(), config, tmp_path / "state",
                            {"model": "tiny"}, progress=False, **kw)
    return model, ranges, history


def test_loss_falls_and_ranges_are_learned(tmp_path):
    model, ranges, history = _train(tmp_path, steps=30)
    first = np.mean([h["cross_entropy"] for h in history[:5]])
    last = np.mean([h["cross_entropy"] for h in history[-5:]])
    assert last < first - 0.5, (first, last)
    assert len(ranges) == 2 * 7 and all(lo <= 0 <= hi and hi > lo for lo, hi in ranges.values())
    assert not any(type(m).__name__ == "QATLinear" for m in model.modules())   # wrappers removed


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    whole, whole_ranges, whole_history = _train(tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_at_5(step, record):
        if step == 5:
            raise Crash   # after the state of step 4 was saved, before step 6's
    with pytest.raises(Crash):
        _train(tmp_path / "b", on_step=crash_at_5)
    assert latest_state(tmp_path / "b" / "state").name == "step-00000004"
    with pytest.raises(QATError, match="pass resume"):
        _train(tmp_path / "b")
    resumed, resumed_ranges, resumed_history = _train(tmp_path / "b", resume=True)
    assert resumed_ranges == whole_ranges
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in whole_history]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_state_from_other_settings_is_refused(tmp_path):
    _train(tmp_path, stop_after=2)
    with pytest.raises(QATError, match="was started with"):
        _train(tmp_path, recipe="w6a6-token", resume=True)


def test_batches_depend_on_the_step_alone():
    w = _windows(n=10)
    assert torch.equal(batch_for_step(w, 7, 4, 0), batch_for_step(w, 7, 4, 0))
    assert not torch.equal(batch_for_step(w, 0, 4, 0), batch_for_step(w, 1, 4, 0))
    assert batch_for_step(_windows(n=2), 0, 4, 0).shape[0] == 4   # fewer windows than a batch: repeated


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    folder = tiny_llama_folder(root)
    text = root / "train.txt"
    text.write_text(" ".join(f"w{i % 20}" for i in range(2000)))
    return folder, text


@pytest.mark.parametrize("recipe", ["w8a8-static", "w8a8-token", "w4a4-token"])
def test_the_result_is_a_quantized_folder_that_runs_on_the_engine(base, tmp_path, recipe):
    folder, text = base
    model = api.train_qat(str(folder), text, recipe=recipe, out=tmp_path / "q", steps=6, seq_len=16, save_every=3,
                          lr=1e-3, progress=False)
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    assert manifest["training"]["finished"] and manifest["training"]["steps_done"] == 6
    assert manifest["base_model"] == str(folder)
    assert not (tmp_path / "q.qat-state").exists()           # removed once the folder is written
    if recipe == "w8a8-static":   # the learned ranges are the static ranges the folder runs with
        layer = manifest["layers"]["model.layers.0.self_attn.o_proj"]
        assert layer["activation"]["dynamic"] is False and "activation_range" in layer
    if recipe == "w4a4-token":   # asymmetric int4 weights: fake quant only (the engine's weights are symmetric)
        reloaded, _ = api.load_model(tmp_path / "q")
        ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    else:
        assert engine_matches_simulation(tmp_path / "q", model)


def test_stop_after_then_resume_matches_one_run(base, tmp_path):
    folder, text = base
    common = dict(recipe="w8a8-static", steps=6, seq_len=16, save_every=2, lr=1e-3, progress=False)
    whole = api.train_qat(str(folder), text, out=tmp_path / "whole", **common)
    state = tmp_path / "state"
    api.train_qat(str(folder), text, out=tmp_path / "half", state_dir=state, stop_after=3, **common)
    assert json.loads((tmp_path / "half" / MANIFEST_FILE).read_text())["training"]["steps_done"] == 3
    assert latest_state(state) is not None
    rest = api.train_qat(str(folder), text, out=tmp_path / "rest", state_dir=state, resume=True, **common)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, rest(input_ids=ids).logits)
    assert not state.exists()


def test_bad_inputs_are_named(base, tmp_path):
    folder, text = base
    with pytest.raises(QATError, match="does not exist"):
        api.train_qat(str(folder), tmp_path / "missing.txt", out=tmp_path / "q", progress=False)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(QATError, match="binary.txt"):
        api.train_qat(str(folder), binary, out=tmp_path / "q", progress=False)
    with pytest.raises(QATError, match="'steps'"):
        api.train_qat(str(folder), text, out=tmp_path / "q", steps=0, progress=False)
    with pytest.raises(QATError, match="stop_after"):
        api.train_qat(str(folder), text, out=tmp_path / "q", steps=4, stop_after=9, progress=False)
    with pytest.raises(QATError, match="causal language model"):
        api.train_qat(build("bert"), _windows(), out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_cli(base, tmp_path, capsys):
    folder, text = base
    rc = cli_main(["train-qat", str(folder), "--data", str(text), "--out", str(tmp_path / "q"), "--steps", "3",
                   "--seq-len", "16", "--recipe", "w8a8-token", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["finished"] and summary["steps_done"] == 3
    rc = cli_main(["train-qat", str(folder), "--data", str(text), "--out", str(tmp_path / "rot"), "--steps", "2",
                   "--seq-len", "16", "--strategy", "rotate", "--option", "seed=2", "--json"])
    assert rc == 0
    assert json.loads((tmp_path / "rot" / MANIFEST_FILE).read_text())["model_transforms"]["rotation"]["seed"] == 2
    capsys.readouterr()
    rc = cli_main(["train-qat", str(folder), "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_a_rotated_linear_is_trained_as_the_engine_runs_it():
    """QAT of a rotated model: the wrapper of a linear that rotates its input online rotates before it quantizes,
    as the quantized model (and the engine) do."""
    from osengine.plugins.registry import make_strategy, resolve_architecture
    from osengine.quant.recipes import load_recipe
    from osengine.train.qat import QATLinear

    model = tiny_llama(vocab_size=64)
    make_strategy("rotate").prepare(model, resolve_architecture(model))
    down = model.model.layers[0].mlp.down_proj
    assert down.input_rotation == "hadamard"
    recipe = load_recipe("w4a4-token")
    down.quantize(recipe.weights, recipe.activation_spec("model.layers.0.mlp.down_proj"))
    wrapped = QATLinear(down, recipe.activation_spec("model.layers.0.mlp.down_proj"))
    x = torch.randn(2, 5, down.in_features, generator=torch.Generator().manual_seed(0))
    x[..., 3] *= 30   # an outlier channel: without the rotation first, the codes would differ
    with torch.no_grad():
        assert torch.allclose(wrapped(x), down(x), atol=1e-5, rtol=1e-5)


def test_rotate_then_train(base, tmp_path):
    """--strategy rotate: the rotated model is trained; the folder records the rotation, loads and gives the same
    logits; the finished state can be kept and quantized again with GPTQ without training."""
    folder, text = base
    common = dict(recipe="w4a4-token", steps=6, seq_len=16, save_every=3, lr=1e-3, strategy="rotate",
                  strategy_options={"seed": 3}, progress=False)
    state = tmp_path / "state"
    model = api.train_qat(str(folder), text, out=tmp_path / "q", state_dir=state, keep_state=True, **common)
    manifest = json.loads((tmp_path / "q" / MANIFEST_FILE).read_text())
    assert manifest["training"]["transform"] == {"strategy": "rotate", "strategy_options": {"seed": 3}}
    assert manifest["model_transforms"]["rotation"]["seed"] == 3
    assert "model.layers.0.mlp.down_proj" in manifest["rotated_linears"]
    assert manifest["recipe"]["weights"]["observer"] == "mse"   # rotate's weight clipping
    reloaded, _ = api.load_model(tmp_path / "q")
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert latest_state(state) is not None   # kept: quantize the trained model again, no training steps
    again = api.train_qat(str(folder), text, out=tmp_path / "g", state_dir=state, resume=True,
                          weight_rounding="gptq", **common)
    training = again.osengine_report["training"]
    assert training["steps_done"] == 6 and training["history"] == model.osengine_report["training"]["history"]
    assert json.loads((tmp_path / "g" / MANIFEST_FILE).read_text())["recipe"]["weights"]["rounding"] == "gptq"
    assert not state.exists()
    with torch.no_grad():
        assert not torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_rotated_trained_folder_runs_on_the_engine(base, tmp_path):
    """rotate + QAT at the engine's W4A4 recipe: the engine (online rotations fused into its quantize op) equals
    the integer-exact simulation of the trained folder."""
    folder, text = base
    model = api.train_qat(str(folder), text, recipe="w4a4-engine", out=tmp_path / "q", steps=4, seq_len=16,
                          lr=1e-3, strategy="rotate", progress=False)
    assert engine_matches_simulation(tmp_path / "q", model)


def test_strategies_that_migrate_are_refused(base, tmp_path):
    folder, text = base
    with pytest.raises(QATError, match="osplus.*migrates"):
        api.train_qat(str(folder), text, out=tmp_path / "q", strategy="osplus", steps=2, seq_len=16, progress=False)
    with pytest.raises(QATError, match="without a strategy"):
        api.train_qat(str(folder), text, out=tmp_path / "q", strategy_options={"seed": 1}, steps=2, seq_len=16,
                      progress=False)
    model, tok = api.load_model(str(folder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QATError, match="does not exist"):   # inputs are checked before the model is rotated
        api.train_qat(model, tmp_path / "missing.txt", tokenizer=tok, out=tmp_path / "q", strategy="rotate",
                      progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "q").exists()

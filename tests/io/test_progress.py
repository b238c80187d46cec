"""Resumable calibration (osengine.io.progress): a run interrupted after any block and resumed writes the same
folder as an uninterrupted run, bit for bit; a run killed with SIGKILL leaves no output folder and resumes from the
command line; another run's or damaged progress is refused with a clear error and nothing is deleted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import osengine
from osengine.io import progress as progress_module
from osengine.io.progress import ProgressError, progress_folder

from tiny_models import build, inject_outliers, tiny_llama

torch.set_num_threads(1)
CALIBRATION = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
# What differs between any two runs, resumed or not: timings and memory.
VOLATILE = ("calibration_seconds", "calibration_data_seconds", "peak_rss_mib", "step_seconds", "progress_seconds",
            "resumed_at_block")


class Interrupted(Exception):
    pass


def model_of(kind, layers=4):
    torch.manual_seed(0)
    model = inject_outliers(build(kind, layers=layers), noise=False, up_rows=False)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def interrupt_after_block(patch, block):
    plain = progress_module.CalibrationProgress.save

    def save(self, index, *args, **kwargs):
        plain(self, index, *args, **kwargs)
        if index == block:
            raise Interrupted

    patch.setattr(progress_module.CalibrationProgress, "save", save)


def folder_contents(folder: Path) -> tuple:
    from safetensors.torch import load_file

    manifest = json.loads((folder / "osengine.json").read_text())
    for key in ("manifest_sha256",):
        manifest.pop(key)
    return load_file(str(folder / "model.safetensors")), manifest


def assert_same_folder(got: Path, want: Path):
    tensors, manifest = folder_contents(got)
    want_tensors, want_manifest = folder_contents(want)
    assert tensors.keys() == want_tensors.keys()
    assert [k for k in tensors if not torch.equal(tensors[k], want_tensors[k])] == []
    assert manifest == want_manifest


@pytest.mark.parametrize("kind,recipe,strategy,options,stop_after", [
    ("llama", "w8a8-static", "osplus", {}, 0),
    ("llama", "w8a8-static", "osplus", {}, 3),       # killed while saving the folder: resumes straight to saving
    ("llama", "w4a8-group", "osplus", {"weight_rounding": "gptq", "strategy_options": {"shift": "runtime"}}, 1),
    ("opt", "w8a8-paper", "osplus", {}, 1),          # shifts folded into LayerNorm biases, quantized BMM inputs
    ("bert", "w8a8-static", "osplus", {}, 2),        # post-LN: block N folds into block N - 1's output norm
    ("qwen2", "w8a8-static", "outliertune", {}, 1),
    ("bloom", "w8a8-token", "smoothquant", {}, 2),
    ("llama", "w4a4-token", "rotate+osplus", {}, 1),   # the rotation is applied again, then the blocks restored
    ("opt", "w8a8-token", "rotate", {"weight_rounding": "gptq"}, 0),   # LayerNorms replaced by RMSNorms
])
def test_a_resumed_run_writes_the_same_folder_as_an_uninterrupted_one(kind, recipe, strategy, options, stop_after,
                                                                         tmp_path):
    arguments = dict(recipe=recipe, strategy=strategy, calibration=CALIBRATION, n_samples=4, seq_len=32,
                     progress=False, **options)
    osengine.quantize(model_of(kind), out=tmp_path / "whole", **arguments)
    assert not progress_folder(tmp_path / "whole").exists()   # removed once the folder is saved
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_block(patch, stop_after)
        with pytest.raises(Interrupted):
            osengine.quantize(model_of(kind), out=tmp_path / "resumed", **arguments)
    assert not (tmp_path / "resumed").exists() and progress_folder(tmp_path / "resumed").is_dir()
    resumed = osengine.quantize(model_of(kind), out=tmp_path / "resumed", resume=True, **arguments)
    assert resumed.osengine_report["resumed_at_block"] == stop_after + 1
    assert_same_folder(tmp_path / "resumed", tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "whole"]


def test_progress_is_kept_until_resumed_and_another_run_is_refused(tmp_path):
    arguments = dict(strategy="osplus", calibration=CALIBRATION, n_samples=4, seq_len=32, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_block(patch, 1)
        with pytest.raises(Interrupted):
            osengine.quantize(model_of("llama"), recipe="w8a8-static", out=tmp_path / "q", **arguments)
    saved = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ProgressError, match=r"holds the progress of an interrupted run .* pass resume=True"):
        osengine.quantize(model_of("llama"), recipe="w8a8-static", out=tmp_path / "q", **arguments)
    with pytest.raises(ProgressError, match=r"belongs to another run: its recipe is .*w8a8-static.*, this run's "
                                            r".*w8a8-token"):
        osengine.quantize(model_of("llama"), recipe="w8a8-token", out=tmp_path / "q", resume=True, **arguments)
    other = model_of("llama")
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    with pytest.raises(ProgressError, match=r"its model_state_sha256 is"):
        osengine.quantize(other, recipe="w8a8-static", out=tmp_path / "q", resume=True, **arguments)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == saved   # nothing deleted or added
    with pytest.raises(ValueError, match="resuming needs the output folder"):
        osengine.quantize(model_of("llama"), recipe="w8a8-static", resume=True, **arguments)
    # resume without progress to continue: a fresh run
    model = osengine.quantize(model_of("llama"), recipe="w8a8-static", out=tmp_path / "fresh", resume=True,
                              **arguments)
    assert "resumed_at_block" not in model.osengine_report and (tmp_path / "fresh" / "osengine.json").is_file()


@pytest.mark.parametrize("damage", ["step tensors", "block file", "state"])
def test_damaged_progress_is_a_clear_error(damage, tmp_path):
    arguments = dict(recipe="w8a8-static", strategy="osplus", calibration=CALIBRATION, n_samples=4, seq_len=32,
                     progress=False)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_block(patch, 1)
        with pytest.raises(Interrupted):
            osengine.quantize(model_of("llama"), out=tmp_path / "q", **arguments)
    folder = progress_folder(tmp_path / "q")
    target = {"step tensors": folder / "step-00002" / "tensors.safetensors",
              "block file": folder / "blocks" / "block-00001.safetensors",
              "state": folder / "step-00002" / "state.json"}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    with pytest.raises(ProgressError, match=r"(is damaged|cannot be read).*delete"):
        osengine.quantize(model_of("llama"), out=tmp_path / "q", resume=True, **arguments)
    assert target.exists() and not (tmp_path / "q").exists()


def test_values_that_cannot_be_recorded_are_named():
    with pytest.raises(ProgressError, match=r"cannot record the report\.cache \(a object\)"):
        progress_module.encode_tree({"cache": object()}, {}, "the report")


def run_quantize(base, out, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "osengine.cli", "quantize", str(base), "--recipe", "w8a8-static",
                             "--calib", str(base.parent / "calibration.txt"), "--samples", "8", "--seq-len", "48",
                             "--threads", "1", "--json", "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_mid_calibration_resumes_from_the_command_line(tmp_path):
    model = tiny_llama(tied=True, layers=6, vocab_size=64, bos_token_id=1, eos_token_id=2,
                       architectures=["LlamaForCausalLM"])
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    base = tmp_path / "base"
    model.save_pretrained(base)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(base)
    words = torch.randint(0, 61, (4000,), generator=torch.Generator().manual_seed(3))
    (tmp_path / "calibration.txt").write_text(" ".join(f"w{i}" for i in words.tolist()))

    whole = run_quantize(base, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = run_quantize(base, tmp_path / "q")
    step = progress_folder(tmp_path / "q") / "step-00002"
    deadline = time.time() + 300
    while not step.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-calibration"
    assert not (tmp_path / "q").exists()   # never a half-written output folder

    resumed = run_quantize(base, tmp_path / "q", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert json.loads(resumed.stdout.read().strip().splitlines()[-1])["out"] == str(tmp_path / "q")
    assert_same_folder(tmp_path / "q", tmp_path / "whole")
    assert not progress_folder(tmp_path / "q").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging folder left behind

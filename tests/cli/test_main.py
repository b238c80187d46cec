"""The command line end to end on a tiny LLaMA saved as a Hugging Face folder (safetensors + fast tokenizer)."""
import json

import pytest
import torch

from osengine.cli import main

from tiny_models import make_model

WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = make_model("llama", bos_token_id=1, eos_token_id=2)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[i] for i in torch.randint(0, 40, (3000,), generator=g).tolist())
    (root / "text.txt").write_text(text)
    return root


def test_quantize_then_eval(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_folder / "model"), "--recipe", "w8a8-static", "--strategy", "osplus",
               "--calib", str(tiny_folder / "text.txt"), "--out", str(out), "--samples", "4", "--seq-len", "64",
               "--option", "max_grid_steps=10", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["strategy"] == "osplus" and (out / "model.safetensors").is_file()
    assert (out / "report.md").read_text().count("| attn |") == 2
    assert (out / "activation_ranges.png").stat().st_size > 1000

    rc = main(["eval", str(tiny_folder / "model"), "--ppl", str(tiny_folder / "text.txt"), "--seq-len", "64",
               "--windows", "4", "--json"])
    fp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rc2 = main(["eval", str(out), "--ppl", str(tiny_folder / "text.txt"), "--seq-len", "64", "--windows", "4",
                "--json"])
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == rc2 == 0 and fp["windows"] == q["windows"] == 4
    assert q["perplexity"] == pytest.approx(fp["perplexity"], rel=0.05)  # W8A8 on a random model: close to FP
    assert q["perplexity"] != fp["perplexity"]  # and really quantized
    # the same folder on the engine (real int8 GEMMs): the perplexity of the fake-quant model
    assert main(["eval", str(out), "--engine", "--ppl", str(tiny_folder / "text.txt"), "--seq-len", "64",
                 "--windows", "4", "--json"]) == 0
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert real["engine"] and real["perplexity"] == pytest.approx(q["perplexity"], rel=1e-3)
    # a second quantize into the same folder is refused (nothing is lost) unless --overwrite
    assert main(["quantize", str(tiny_folder / "model"), "--calib", str(tiny_folder / "text.txt"), "--out",
                 str(out)]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err


def test_reload_matches_in_memory_model(tiny_folder, tmp_path):
    from osengine import api

    out = tmp_path / "q"
    model = api.quantize(str(tiny_folder / "model"), recipe="w6a6", strategy="osplus",
                         calibration=str(tiny_folder / "text.txt"), n_samples=4, seq_len=64, out=out,
                         strategy_options={"max_grid_steps": 10}, progress=False)
    reloaded, _ = api.load_model(out)
    ids = torch.randint(3, 43, (2, 64))
    assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_generated_calibration_and_evaluation(tiny_folder, tmp_path, capsys):
    """The README's job on a machine without data: calibrate and evaluate on text the FP model writes."""
    out = tmp_path / "g"
    rc = main(["quantize", str(tiny_folder / "model"), "--recipe", "w4a8", "--strategy", "minmax",
               "--calib", "generated", "--samples", "2", "--seq-len", "16", "--out", str(out), "--json"])
    assert rc == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--ppl", "generated", "--seq-len", "16", "--windows", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["text"] == "generated" and res["windows"] == 2 and res["perplexity"] > 1


def test_gptq_rounding_and_strategy_options_from_the_command_line(tiny_folder, tmp_path, capsys):
    out = tmp_path / "gptq"
    rc = main(["quantize", str(tiny_folder / "model"), "--recipe", "w6a6-token",
               "--calib", str(tiny_folder / "text.txt"), "--weight-rounding", "gptq",
               "--option", "shift=runtime", "--option", "shift_quantile=0.01",
               "--option", "shift_sites=attn,mlp", "--option", "max_grid_steps=10", "--out", str(out), "--json"])
    assert rc == 0
    manifest = json.loads((out / "osengine.json").read_text())
    assert manifest["recipe"]["weights"]["rounding"] == "gptq"
    assert manifest["strategy_options"]["shift_sites"] == "attn,mlp"
    assert any(e["runtime_shift"] for e in manifest["layers"].values())


@pytest.mark.parametrize("args, message", [
    (["--recipe", "w9a9"], "neither a preset"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--calib", "/nonexistent.txt"], "does not exist"),
    (["--option", "shift=sideways"], "'shift'"),
    (["--option", "shift_quantile=0.7"], "'shift_quantile'"),
])
def test_clear_errors(tiny_folder, args, message, capsys):
    rc = main(["quantize", str(tiny_folder / "model"), "--calib", str(tiny_folder / "text.txt"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_bad_recipe_file_names_field(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: {bits: 12}\nactivations: {}\n")
    assert main(["quantize", str(tiny_folder / "model"), "--recipe", str(bad)]) == 2
    assert "'weights.bits'" in capsys.readouterr().err


def test_unknown_model_and_listing(capsys):
    assert main(["eval", "no-such-model", "--ppl", "x.txt"]) == 2
    assert "registered name" in capsys.readouterr().err
    assert main(["recipes"]) == 0
    assert "w8a8-static" in capsys.readouterr().out
    assert main(["plugins", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert {"osplus", "smoothquant", "minmax", "llama", "opt", "bloom", "bert"} <= names


def test_outliers_command(tiny_folder, tmp_path, capsys):
    plot = tmp_path / "outliers.png"
    rc = main(["outliers", str(tiny_folder / "model"), "--calib", str(tiny_folder / "text.txt"), "--samples", "4",
               "--seq-len", "32", "--plot", str(plot), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == 4 and out["seq_len"] == 32
    first = out["measurements"][0]
    assert first["prefix"] == [] and len(first["block_worst"]) == 2 and first["threshold"] == 64.0
    assert out["prefix"] == out["measurements"][-1]["prefix"] and len(out["prefix"]) == len(out["prefix_tokens"])
    assert plot.stat().st_size > 1000
    assert main(["outliers", str(tiny_folder / "model"), "--calib", str(tiny_folder / "text.txt"), "--samples", "2",
                 "--seq-len", "16"]) == 0
    table = capsys.readouterr().out
    assert "| prefix | worst ratio |" in table and ("prefix:" in table or "no prefix" in table)

"""End-to-end benchmark (osengine bench) and the engine-model pieces it measures: fused shared-input linears, int8
embeddings, the separate-shift switch. Tiny random LLaMAs and a handful of tokens: fast."""
import argparse
import copy
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import osengine
from osengine.cli import bench
from osengine.runtime.convert import convert_to_engine
from osengine.runtime.embedding import EngineEmbedding, quantize_embeddings
from osengine.runtime.fusion import unfold_gates, unfold_norms
from osengine.runtime.linear import EngineLinear
from osengine.runtime.memory import model_memory, set_shift_mode

from tiny_models import tiny_llama


def quantized(recipe="w8a8-static", tied=False, **options):
    model = tiny_llama(tied)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    osengine.quantize(model, recipe=recipe, strategy="osplus", calibration=calibration, progress=False,
                      strategy_options=options or None)
    return model


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def bench_args(*extra):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--random", "tiny", "--prefill", "1x8,2x4", "--decode-batch", "1,2", "--new-tokens", "3",
                         "--prompt-len", "4", "--repeats", "2", "--warmup", "0", "--calib-samples", "2",
                         "--calib-seq-len", "16", *extra])
    bench.parse_points(args)
    return args


# ---- the benchmark ----


def test_records_have_the_required_fields_and_types():
    records = bench.run_impls(["fp32"], bench_args()) + bench.run_impls(["w8a8"], bench_args())
    assert [(r["impl"], r["phase"], r["batch"], r["tokens"]) for r in records] == [
        (impl, phase, b, t) for impl in ("fp32", "w8a8")
        for phase, b, t in (("prefill", 1, 8), ("prefill", 2, 4), ("decode", 1, 3), ("decode", 2, 3))]
    for r in records:
        for field, kind in bench.REQUIRED_FIELDS.items():
            assert isinstance(r[field], kind), (field, r[field])
        assert r["device"].startswith("cpu") and r["ms"] > 0 and r["peak_mem_mb"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["tokens"] / (r["ms"] / 1e3), rel=1e-3)
        assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["samples"] == 2
    fp, w8 = records[0]["model_mb"], records[-1]["model_mb"]
    assert fp / w8 > 3  # int8 linears, embedding and lm_head against fp32
    assert "| w8a8 | decode | 2 x 3 |" in bench.table(records)
    verdicts = dict((name, verdict) for name, _, verdict in bench.targets(records, "cpu"))
    assert verdicts["prefill 1x512 w8a8 >= 1.5x fp32"] == "SKIP"  # not measured here


def test_shift_pair_shares_a_process_and_unknown_impls_are_refused():
    assert bench.process_groups(["fp32", "w8a8_shift_fused", "w8a8", "w8a8_shift_separate"]) == [
        ["fp32"], ["w8a8_shift_fused", "w8a8_shift_separate"], ["w8a8"]]
    with pytest.raises(ValueError, match="unknown impl"):
        bench_args("--impl", "fp32,w9a9")
    with pytest.raises(ValueError, match="--prefill must look like"):
        bench_args("--prefill", "512")


def test_cli_bench_prints_json_records(tmp_path):
    cmd = [sys.executable, "-m", "osengine.cli", "bench", "--random", "tiny", "--impl", "fp32,w4a8", "--prefill",
           "1x8", "--decode-batch", "1", "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1", "--warmup", "0",
           "--calib-samples", "2", "--calib-seq-len", "16", "--json", "--plot", str(tmp_path / "e2e.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    records = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["impl"], r["phase"]) for r in records} == {("fp32", "prefill"), ("fp32", "decode"),
                                                          ("w4a8", "prefill"), ("w4a8", "decode")}
    assert all(set(bench.REQUIRED_FIELDS) <= set(r) for r in records)
    assert (tmp_path / "e2e.png").stat().st_size > 1000


class ScriptedRunner:
    """Stands in for a Runner: logs the samples it is asked for; fails on its `fail_at`-th call."""

    def __init__(self, impls, log, fail_at=None):
        self.impls, self.log, self.fail_at, self.calls = impls, log, fail_at, 0

    def sample(self, impl, phase, batch, tokens, timed):
        self.calls += 1
        if self.calls == self.fail_at:
            raise bench.RunnerFailed("exit 1")
        self.log.append((impl, phase, batch, timed))
        return 1.0


def test_drive_interleaves_the_impls_and_drops_a_failed_runner():
    args = bench_args("--prefill", "1x8", "--decode-batch", "2", "--warmup", "1", "--repeats", "3")
    log = []
    fp, shift = ScriptedRunner(["fp32"], log), ScriptedRunner(["w8a8_shift_fused", "w8a8_shift_separate"], log)
    assert bench.drive([fp, shift], args) == [fp, shift]
    prefill = [(impl, timed) for impl, phase, _, timed in log if phase == "prefill"]
    # Warm-up for every impl first, then timed rounds over all impls with the first one rotating.
    assert prefill == [("fp32", False), ("w8a8_shift_fused", False), ("w8a8_shift_separate", False),
                       ("fp32", True), ("w8a8_shift_fused", True), ("w8a8_shift_separate", True),
                       ("w8a8_shift_fused", True), ("w8a8_shift_separate", True), ("fp32", True),
                       ("w8a8_shift_separate", True), ("fp32", True), ("w8a8_shift_fused", True)]
    assert [p for _, p, _, _ in log] == ["prefill"] * 12 + ["decode"] * 12  # points one after the other

    log.clear()
    w8 = ScriptedRunner(["w8a8"], log, fail_at=3)
    fp = ScriptedRunner(["fp32"], log)
    assert bench.drive([w8, fp], args) == [fp]  # the failed one is dropped, the rest measured to the end
    assert sum(1 for impl, *_ in log if impl == "fp32") == 8 and sum(1 for impl, *_ in log if impl == "w8a8") == 2


# ---- the engine model it measures ----


@pytest.mark.parametrize("recipe", ["w8a8-static", "w4a8"])
def test_engine_greedy_tokens_equal_the_fake_quant_models(recipe):
    model = quantized(recipe)
    prompt = IDS[:, :6]
    want = logits(model)
    with torch.no_grad():
        fake_tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)
    unfused = convert_to_engine(copy.deepcopy(model), fuse=False)
    fused_plain = convert_to_engine(copy.deepcopy(model))
    assert unfold_norms(fused_plain) == 2 * 2  # input and post-attention RMSNorm of 2 layers
    assert unfold_gates(fused_plain) == 2  # each layer's SiLU gate
    assert torch.equal(logits(fused_plain), logits(unfused))  # every column is computed as by the layer alone
    convert_to_engine(model)  # fused q/k/v and gate/up; RMSNorms and SiLU gates folded into activation quantization
    fused = [m for m in model.modules() if isinstance(m, EngineLinear) and m.group is not None]
    assert len(fused) == 2 * 5  # 2 layers x (q, k, v, gate, up)
    assert len({id(m.group) for m in fused if m.group.layer.prologue.rms_norm is not None}) == 2 * 2
    assert sum(1 for m in model.modules() if isinstance(m, EngineLinear) and m.prologue.silu_gate) == 2  # down_projs
    got = logits(model)
    assert rel(got, want) < 1e-3
    assert rel(got, logits(unfused)) < 1e-4  # the norm in the kernel: fp32, its own summation order
    with torch.no_grad():
        engine_tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(engine_tokens, fake_tokens)
    _, manual = bench.greedy_decode(model, prompt, 12, "cpu")  # the benchmark's decode loop: the same tokens
    assert torch.equal(manual[:, :12], engine_tokens[:, prompt.shape[1]:])


def test_fused_layers_recompute_for_a_new_or_modified_input():
    model = convert_to_engine(quantized("w4a8"))
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        q1 = attn.q_proj(x1).clone()
        assert not torch.equal(attn.q_proj(x2), q1)  # another input
        k2 = attn.k_proj(x2).clone()
        x2.mul_(2)  # modified in place: the version counter changes
        assert not torch.equal(attn.k_proj(x2), k2)
        assert torch.equal(attn.q_proj(x1), q1)
    codes = attn.k_proj.weight_codes()
    assert codes.shape == (32, 64) and attn.k_proj.packed is None


@pytest.mark.parametrize("tied", [False, True])
def test_int8_embeddings_are_close_and_smaller(tied):
    model = convert_to_engine(quantized("w8a8-static", tied=tied))
    before, memory = logits(model), model_memory(model)["total"]
    quantize_embeddings(model)  # what convert_to_engine(..., quantize_embeddings=True) does last
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, EngineEmbedding) and isinstance(head, EngineLinear)
    assert (emb.source is head) == tied  # a tied pair keeps one int8 copy
    after = logits(model)
    assert rel(after, before) < 0.05
    saved = model_memory(model)["total"]
    fp_table = 128 * 64 * 4 * (1 if tied else 2)
    assert memory - saved > 0.6 * fp_table
    with torch.no_grad():
        looked_up = emb(IDS)
        codes, scale = (head.weight_codes(), head.w_scale) if tied else (emb.codes, emb.row_scale)
    assert torch.equal(looked_up, codes[IDS].float() * scale[IDS].unsqueeze(-1))


def test_separate_shift_pass_gives_the_same_logits():
    model = convert_to_engine(quantized("w8a8-static", shift="runtime"))
    shifted = [m for m in model.modules() if isinstance(m, EngineLinear) and m.input_shift is not None]
    assert shifted
    fused = logits(model)
    assert set_shift_mode(model, "separate") > 0
    separate = logits(model)
    assert rel(separate, fused) < 1e-5
    set_shift_mode(model, "fused")
    assert torch.equal(logits(model), fused)


def test_random_smollm2_has_smollm2_shapes():
    # what the GPU check kit benchmarks where SmolLM2's weights package is not installed
    model = bench.random_model("smollm2", device="meta")
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2's are
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with pytest.raises(ValueError, match="expected one of llama7b, smollm2, tiny"):
        bench.random_model("gpt5")

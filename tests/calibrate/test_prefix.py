"""Outlier tokens and the prefix that takes their role (osengine.calibrate.prefix)."""
import pytest
import torch
import torch.nn as nn

from osengine.calibrate.prefix import (
    OutlierReport,
    choose_prefix,
    measure_outlier_tokens,
    plot_outlier_ratios,
    prefix_key_values,
    run_after_prefix,
)
from osengine.plugins.api import Architecture

from tiny_models import build

BOS, DELIM, LOUD = 1, 7, 9


class SinkModel(nn.Module):
    """Massive activations with the dynamics of real LLMs, written down: the first position of a sequence and the
    first occurrence of DELIM in it are x1000 at block 0's linear input (attention sinks); LOUD is x1000 wherever it
    is (a token property no prefix removes). Block 1 sees ordinary inputs."""

    def __init__(self, vocab=32, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.embed.weight.abs_().add_(0.5)   # every token's max |x| of the same order
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(d, d)}) for _ in range(2)])

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        seen_delim = torch.cumsum(input_ids == DELIM, dim=1)
        first_delim = (input_ids == DELIM) & (seen_delim == 1)
        sink = torch.zeros_like(input_ids, dtype=torch.bool)
        sink[:, 0] = True
        loud = sink | first_delim | (input_ids == LOUD)
        x = x * torch.where(loud, 1000.0, 1.0)[..., None]
        for i, layer in enumerate(self.layers):
            x = layer["proj"](x if i == 0 else x / 1000.0 + 1.0)
        return x


class SinkArch(Architecture):
    name = "sink-test"
    layers = ("layers",)

    def sites(self, model, index):
        return []


def sink_samples(n=8, length=24, delim=True, loud_in=(0,)):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 32, (n, length), generator=g)
    if delim:
        ids[:, 5] = DELIM
        ids[:, 15] = DELIM   # second occurrence: ordinary
    for s in loud_in:
        ids[s, 9] = LOUD
    return ids


def test_detection_names_the_tokens_positions_and_blocks():
    model, arch, ids = SinkModel(), SinkArch(), sink_samples()
    report = measure_outlier_tokens(model, arch, ids)
    flagged = {(t.sample, t.position, t.token_id) for t in report.tokens}
    expected = {(s, 0, int(ids[s, 0])) for s in range(8)} | {(s, 5, DELIM) for s in range(8)} | {(0, 9, LOUD)}
    assert flagged == expected
    assert {t.block for t in report.tokens} == {0} and {t.linear for t in report.tokens} == {"proj"}
    assert report.worst_ratio() > 500 and max(report.worst[1].values()) < 10
    assert report.first_position_samples() == 8
    assert report.counts()[DELIM] == 8 and report.counts()[LOUD] == 1
    # padding never counts: a masked-out LOUD is not an outlier
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    assert LOUD not in measure_outlier_tokens(model, arch, ids, mask).counts()


def test_prefix_takes_the_sink_and_the_recurring_delimiter_only():
    model, arch, ids = SinkModel(), SinkArch(), sink_samples()
    prefix, reports = choose_prefix(model, arch, ids, bos_token_id=BOS)
    # BOS for the first-position sink, DELIM for its first occurrences; not LOUD (rare, and a prefix cannot help it)
    assert prefix == [BOS, DELIM]
    assert [r.prefix for r in reports] == [[], [BOS], [BOS, DELIM]]
    final = reports[-1]
    assert {t.token_id for t in final.tokens} == {LOUD}
    # prefix positions are not measured: the ranges of everything else shrink by the injected factor
    ordinary = [t for t in reports[0].tokens if t.token_id != LOUD]
    assert min(t.ratio for t in ordinary) > 500
    assert final.first_position_samples() == 0 and final.counts()[DELIM] == 0


def test_a_recurring_token_that_a_prefix_cannot_help_is_tried_and_left_out():
    model, arch = SinkModel(), SinkArch()
    ids = sink_samples(delim=False, loud_in=(0, 1, 2))
    prefix, reports = choose_prefix(model, arch, ids, bos_token_id=BOS)
    assert prefix == [BOS]                    # LOUD recurs but stays loud behind a prefix
    assert reports[-1].counts()[LOUD] == 3


def test_no_outliers_no_prefix():
    model, arch = SinkModel(), SinkArch()
    ids = sink_samples(delim=False, loud_in=())
    report = measure_outlier_tokens(model, arch, ids, threshold=2000.0)
    assert report.tokens == []
    prefix, reports = choose_prefix(model, arch, ids, bos_token_id=BOS, threshold=2000.0)
    assert prefix == [] and len(reports) == 1
    assert choose_prefix(model, arch, ids, bos_token_id=BOS, max_length=0)[0] == []


def test_without_bos_the_most_common_first_token_is_the_sink():
    model, arch = SinkModel(), SinkArch()
    ids = sink_samples(delim=False, loud_in=())
    ids[:5, 0] = 12
    prefix, _ = choose_prefix(model, arch, ids, bos_token_id=None)
    assert prefix == [12]


def test_bad_arguments_are_named():
    model, arch = SinkModel(), SinkArch()
    with pytest.raises(ValueError, match="token ids \\[samples, tokens\\]"):
        measure_outlier_tokens(model, arch, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold must be > 1"):
        measure_outlier_tokens(model, arch, sink_samples(), threshold=0.5)
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        choose_prefix(model, arch, sink_samples(), max_length=-1)


def test_a_real_llama_block_with_an_injected_massive_token(tmp_path):
    """Hooks on a transformers LLaMA: a token whose embedding drives a gate/up channel of block 0 makes its
    down_proj input massive; q/k/v and gate/up are measured once per input."""
    from osengine.plugins.registry import resolve_architecture

    model = build("llama", layers=2, vocab_size=64)
    token = 11
    channel = 5
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, channel] = 0.0
        embed[token] = 0.0
        embed[token, channel] = 1.0      # the token alone lives on `channel`, which only gate/up row 0 reads
        mlp = model.model.layers[0].mlp
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight[:, channel] = 0.0
            linear.weight[0] = 0.0
            linear.weight[0, channel] = 50.0
    arch = resolve_architecture(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 64, (4, 16), generator=g)
    ids[:, 7] = token
    report = measure_outlier_tokens(model, arch, ids)
    down = [t for t in report.tokens if t.block == 0 and t.linear == "mlp.down_proj"]
    assert {(t.sample, t.position, t.token_id) for t in down} == {(s, 7, token) for s in range(4)}
    assert set(report.worst[0]) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    plot_outlier_ratios([report], tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").stat().st_size > 1000
    assert isinstance(report, OutlierReport) and report.to_dict()["outlier_tokens"][str(token)] == 4


# ---------------------------------------------------------------- calibration and inference behind a prefix

def massive_token_llama(token=11, channel=5):
    """A tiny LLaMA whose `token` alone drives one gate/up channel of block 0: its down_proj input is massive."""
    model = build("llama", layers=2, vocab_size=64)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, channel] = 0.0
        embed[token] = 0.0
        embed[token, channel] = 1.0
        mlp = model.model.layers[0].mlp
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight[:, channel] = 0.0
            linear.weight[0] = 0.0
            linear.weight[0, channel] = 50.0
    return model


def sink_led_samples(token=11, n=8, length=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 64, (n, length), generator=g)
    ids[:, 0] = token   # every sample starts with the massive token, as every sequence starts with its sink
    return ids


def test_prefix_positions_are_neither_quantized_nor_observed():
    from osengine.quant.observers import ActQuantizer, set_fp_prefix
    from osengine.quant.spec import QuantSpec

    q = ActQuantizer(QuantSpec(bits=8, granularity="per-tensor"))
    set_fp_prefix(q, 1)
    x = torch.randn(2, 5, 8)
    x[:, 0] *= 1000.0
    q(x)                                       # observe
    assert float(q.hi) == pytest.approx(float(x[:, 1:].max())) and float(q.lo) == pytest.approx(float(x[:, 1:].min()))
    q.mode = "quantize"
    y = q(x)
    assert torch.equal(y[:, 0], x[:, 0])       # the prefix passes through exactly
    q.fp_prefix = 0
    assert torch.equal(y[:, 1:], q(x[:, 1:]))  # the rest as without a prefix
    with pytest.raises(ValueError, match="prefix length must be >= 0"):
        set_fp_prefix(q, -1)


def test_calibration_behind_the_prefix_keeps_the_static_ranges_narrow(tmp_path):
    import osengine

    token = 11
    ids = sink_led_samples(token)
    ranges = {}
    models = {}
    for prefix in ("none", "auto"):
        model = massive_token_llama(token)
        osengine.quantize(model, "w8a8-static", "minmax", calibration=ids, prefix=prefix, n_samples=8, seq_len=24,
                          progress=False, out=tmp_path / prefix)
        act = model.model.layers[0].mlp.down_proj.act_quant
        ranges[prefix] = max(abs(float(act.lo)), abs(float(act.hi)))
        models[prefix] = model
    prefix = models["auto"].osengine_prefix
    assert prefix[0] == token                                  # no tokenizer: the samples' common first token
    assert models["auto"].osengine_report["prefix_detection"][0]["first_position_samples"] == 8
    assert models["none"].osengine_prefix == []
    assert ranges["none"] > 30 * ranges["auto"]                # the massive token no longer sets the range

    # the folder records the prefix and its keys and values (format 4) and reloads the same model behind them
    reloaded = osengine.load_model(tmp_path / "auto")[0]
    assert reloaded.osengine_prefix == prefix
    assert len(reloaded.osengine_prefix_kv) == 2
    for (k, v), (k2, v2) in zip(models["auto"].osengine_prefix_kv, reloaded.osengine_prefix_kv):
        assert torch.equal(k, k2) and torch.equal(v, v2) and k.shape == (2, len(prefix), 16)
    window = torch.randint(20, 64, (1, 16))
    with torch.no_grad():
        want = run_after_prefix(models["auto"], window).logits
        got = run_after_prefix(reloaded, window).logits
    assert torch.equal(want, got)
    import json
    manifest = json.loads((tmp_path / "auto" / "osengine.json").read_text())
    assert manifest["prefix"] == prefix and manifest["format_version"] == 4
    from osengine.calibrate.report import markdown_table
    assert f"full-precision prefix (outlier tokens): {prefix}" in markdown_table(models["auto"].osengine_report)


def test_between_blocks_the_prefix_rows_are_the_fp_models():
    # the quantized model reads the FP model's prefix keys and values, so calibration feeds each block the FP
    # model's hidden states at the prefix positions (not what the quantized blocks before it would make of them)
    import copy

    from osengine.calibrate.blocks import hidden_states
    from osengine.calibrate.pipeline import BLOCK_STEPS, BlockStep, calibrate_blockwise
    from osengine.plugins.registry import make_strategy, resolve_architecture
    from osengine.quant.recipes import load_recipe

    model = massive_token_llama()
    _, fp_hidden = prefix_key_values(copy.deepcopy(model), [11, 3])
    seen = []
    record = BlockStep("record", lambda state: seen.append(hidden_states(state.calls[0])[:, :2].clone()))
    calibrate_blockwise(model, resolve_architecture(model), load_recipe("w8a8-static"), make_strategy("minmax"),
                        sink_led_samples(), batch_size=4, progress=False, prefix=[11, 3],
                        steps=(record,) + BLOCK_STEPS)
    assert len(seen) == 2
    for h, want in zip(seen, fp_hidden):
        torch.testing.assert_close(h, want.expand_as(h), rtol=1e-5, atol=1e-5)


def test_the_stored_prefix_stands_for_the_prefix_tokens():
    # the keys and values of the prefix in front of a sequence's own: as if the prefix tokens were read first
    model = massive_token_llama().eval()
    ids = torch.randint(20, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    kv, hidden = prefix_key_values(model, [11, 3])
    assert len(kv) == 2 and kv[0][0].shape == (2, 2, 16) and len(hidden) == 2 and hidden[0].shape == (1, 2, 64)
    model.osengine_prefix, model.osengine_prefix_kv = [11, 3], kv
    with torch.no_grad():
        got = run_after_prefix(model, ids).logits
        want = model(input_ids=torch.cat([torch.tensor([[11, 3]] * 2), ids], 1)).logits[:, 2:]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        # decoding goes on behind it: the cache holds prefix + prompt
        first = run_after_prefix(model, ids[:, :-1], use_cache=True)
        assert first.past_key_values.get_seq_length() == 2 + 11
        step = run_after_prefix(model, ids[:, -1:], past=first.past_key_values).logits
    assert torch.allclose(step[:, 0], got[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("online", ["down", "all"])
def test_a_rotated_model_stores_the_keys_and_values_of_its_own_prefix(online):
    # PrefixQuant's setting: a rotation first, then the prefix. The rotation rotates each value head, so the prefix's
    # keys and values must come from the rotated model (strategy.prepare runs before they are computed): in floating
    # point (every linear kept FP) the rotated model behind its stored prefix predicts as the FP model reading the
    # prefix tokens first; the FP model's own values would not do.
    import copy

    import osengine

    fp = massive_token_llama().eval()
    ids = torch.randint(20, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = fp(input_ids=torch.cat([torch.tensor([[11]] * 2), ids], 1)).logits[:, 1:]
    rotated = copy.deepcopy(fp)
    osengine.quantize(rotated, "w8a8-static", "rotate", calibration=sink_led_samples(), prefix=[11], n_samples=8,
                      seq_len=24, progress=False, strategy_options={"online": online},
                      keep_fp=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert rotated.osengine_report["model_transforms"]["rotation"]
    fp_kv = prefix_key_values(fp, [11])[0]
    for (k, v), (fp_k, fp_v) in zip(rotated.osengine_prefix_kv, fp_kv):
        torch.testing.assert_close(k, fp_k, rtol=0, atol=1e-6)    # q and k read the rotated stream back
        assert (v - fp_v).abs().max() > 0.1                        # the value heads are rotated
    with torch.no_grad():
        torch.testing.assert_close(run_after_prefix(rotated, ids).logits, want, rtol=0, atol=1e-5)
        rotated.osengine_prefix_kv = fp_kv
        assert (run_after_prefix(rotated, ids).logits - want).abs().max() > 1e-3


def test_perplexity_reads_the_prefix_and_counts_only_the_window():
    from osengine.evaluation import perplexity_on_windows

    model = massive_token_llama()
    windows = torch.randint(20, 64, (2, 12))
    plain = perplexity_on_windows(model, windows, progress=False)
    behind = perplexity_on_windows(model, windows, progress=False, prefix=[11])
    assert behind["tokens"] == plain["tokens"] == 2 * 11 and behind["prefix"] == [11]
    with torch.no_grad():
        nll = 0.0
        for w in windows:
            logits = model(input_ids=torch.cat([torch.tensor([11]), w]).unsqueeze(0)).logits[0, 1:-1]
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
    assert behind["nll"] == pytest.approx(nll / 22, rel=1e-6) and behind["nll"] != plain["nll"]
    # a model quantized behind the prefix reads its stored keys and values instead: the same predictions
    model.osengine_prefix, model.osengine_prefix_kv = [11], prefix_key_values(model, [11])[0]
    stored = perplexity_on_windows(model, windows, progress=False)
    assert stored["prefix"] == [11] and stored["nll"] == pytest.approx(behind["nll"], rel=1e-5)


@pytest.mark.parametrize("strategy, options", [("minmax", None),
                                               ("rotate+osplus", {"online": "down", "max_grid_steps": 10})])
def test_engine_runs_behind_the_prefix_as_the_simulation_does(tmp_path, strategy, options):
    import osengine

    model = massive_token_llama()
    osengine.quantize(model, "w8a8-static", strategy, calibration=sink_led_samples(), prefix=[11], n_samples=8,
                      seq_len=24, progress=False, out=tmp_path / "q", strategy_options=options)
    engine = osengine.load(tmp_path / "q")[0]
    assert engine.osengine_prefix == [11] and len(engine.osengine_prefix_kv) == 2
    from osengine.api import _greedy_tokens
    from osengine.quant.layers import set_integer_exact
    from osengine.runtime.simulate import simulate_folded_prologues
    simulation = osengine.load_model(tmp_path / "q")[0]
    set_integer_exact(simulation)
    simulate_folded_prologues(simulation, engine)
    ids = torch.randint(20, 64, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens = _greedy_tokens(engine, ids, 12)
        assert torch.equal(tokens, _greedy_tokens(simulation, ids, 12))
        assert torch.equal(run_after_prefix(engine, tokens).logits, run_after_prefix(simulation, tokens).logits)
        # and the prefix matters: without it the same tokens read differently
        assert not torch.equal(engine(input_ids=tokens).logits, run_after_prefix(engine, tokens).logits)


def test_a_recipe_can_ask_for_the_prefix():
    import osengine
    from osengine.quant.recipes import load_recipe

    recipe = load_recipe("w8a8-static").to_dict() | {"prefix": "auto"}
    model = osengine.quantize(massive_token_llama(), recipe, "minmax", calibration=sink_led_samples(), n_samples=8,
                              seq_len=24, progress=False)
    assert model.osengine_prefix[0] == 11 and model.osengine_report["recipe"]["prefix"] == "auto"
    # the argument wins over the recipe
    model = osengine.quantize(massive_token_llama(), recipe, "minmax", calibration=sink_led_samples(), n_samples=8,
                              seq_len=24, progress=False, prefix="none")
    assert model.osengine_prefix == []
    # "auto" in a recipe means nothing for an encoder (no KV cache to put a prefix in); asked for, it is an error
    encoder = build("bert", layers=1, vocab_size=64)
    model = osengine.quantize(encoder, recipe, "minmax", calibration=torch.randint(5, 60, (4, 16)), n_samples=4,
                              seq_len=16, progress=False)
    assert getattr(model, "osengine_prefix", []) == []


def test_what_cannot_carry_a_prefix_says_so(tmp_path):
    import osengine
    from osengine.evaluation import EvaluationError, lm_eval_model
    from osengine.io.export import ExportError, export

    model = massive_token_llama()
    osengine.quantize(model, "w8a8-static", "minmax", calibration=sink_led_samples(), prefix=[11], n_samples=8,
                      seq_len=24, progress=False, out=tmp_path / "q")
    with pytest.raises(ExportError, match="full-precision KV prefix \\[11\\]"):
        export(tmp_path / "q", out=tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(EvaluationError, match="without the prefix \\[11\\]"):
        lm_eval_model(model, None)
    with pytest.raises(ValueError, match="prefix token ids must be integers in \\[0, 64\\)"):
        osengine.quantize(massive_token_llama(), "w8a8-static", "minmax", calibration=sink_led_samples(),
                          prefix=[99], n_samples=8, seq_len=24, progress=False)
    encoder = build("bert", layers=1, vocab_size=64)
    with pytest.raises(ValueError, match="only causal language models have"):
        osengine.quantize(encoder, "w8a8-static", "minmax", calibration=torch.randint(5, 60, (4, 16)),
                          prefix="auto", n_samples=4, seq_len=16, progress=False)
    with pytest.raises(ValueError, match="prefix must be 'auto', 'none' or a list"):
        osengine.quantize(massive_token_llama(), "w8a8-static", "minmax", calibration=sink_led_samples(),
                          prefix="sometimes", n_samples=8, seq_len=24, progress=False)

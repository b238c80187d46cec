"""The compressed-tensors export checked with a real client on a real model (not a CI test).

SmolLM2-135M (LLaMA architecture) is quantized with OS+ (calibrated on WikiText-2 validation text), exported with
`osengine.io.export.export_compressed_tensors`, loaded back through transformers with the compressed-tensors package,
and its logits on the first --tokens tokens of ../shared/data/wikitext-2-raw/wiki.test.raw are compared with the
fake-quant model's (and with floating point). The w8a8-static preset's activation codes use the full int8 range
(activations.full_range: true), as compressed-tensors and vLLM do; `w8a8-static-restricted` keeps the paper's
symmetric range, whose codes stop at -127 where int8 runtimes clamp at -128 (values beyond the calibrated range then
quantize one step apart): every comparison is also reported with osengine's clamp moved to -128.

Relative errors (||export - osengine|| / ||osengine||): per linear, each exported linear on the very input the
osengine linear sees (the format's fidelity); end to end, the logits, next to their noise floor: osengine's own logits
when its input embeddings are scaled by 1 + 1e-6 (a deep quantized model turns any float-level difference, such as a
code flipping at a rounding tie, into a different set of rounding decisions in the following layers).

    python benchmarks/export_check.py                        # w8a8-static (-restricted), w8a8-token: a table
    python benchmarks/export_check.py --samples 4 --json     # cheaper calibration; one JSON object per recipe
    python benchmarks/export_check.py --recipes w4a8-group-asym w4a8-group          # W4A8 (pack-quantized)
    python benchmarks/export_check.py --recipes w4a8-group --weights-only          # W4A16: against our model
                                                                                   # with activations in float
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OSENGINE_DATA", ROOT.parent / "shared" / "data"))
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKI_CALIB = DATA / "wikitext-2" / "valid.txt"

# Recipes that are not presets: W8A8 with dynamic per-token activations (asymmetric: the same quantizer as
# compressed-tensors'; symmetric: compressed-tensors' simulation divides by 127.5 where vLLM and osengine use 127).
EXTRA_RECIPES = {
    "w8a8-token": {"name": "w8a8-token", "weights": {"bits": 8, "symmetric": True, "granularity": "per-channel"},
                   "activations": {"bits": 8, "symmetric": False, "granularity": "per-token", "dynamic": True}},
    "w8a8-static-restricted": {"name": "w8a8-static-restricted",
                               "weights": {"bits": 8, "symmetric": True, "granularity": "per-channel"},
                               "activations": {"bits": 8, "symmetric": True, "granularity": "per-tensor",
                                               "dynamic": False}},
    "w4a8-group-asym": {"name": "w4a8-group-asym",
                        "weights": {"bits": 4, "symmetric": True, "granularity": "per-group", "group_size": 32,
                                    "scale_dtype": "float16"},
                        "activations": {"bits": 8, "symmetric": False, "granularity": "per-token", "dynamic": True}},
    "w8a8-token-sym": {"name": "w8a8-token-sym",
                       "weights": {"bits": 8, "symmetric": True, "granularity": "per-channel"},
                       "activations": {"bits": 8, "symmetric": True, "granularity": "per-token", "dynamic": True}},
}


class int8_full_range:
    """Within this context osengine's symmetric activation fake quant clamps at -2^(b-1) like int8 runtimes
    (compressed-tensors, vLLM) instead of -(2^(b-1) - 1): the one place where the two quantizers differ."""

    def __enter__(self):
        import torch

        from osengine.quant import observers as quantizers

        self.plain = plain = quantizers.fake_quant

        def fake_quant(x, delta, zero_point, spec):
            if not spec.symmetric:
                return plain(x, delta, zero_point, spec)
            return torch.clamp(torch.round(x / delta), -(2 ** (spec.bits - 1)), spec.qmax) * delta

        quantizers.fake_quant = fake_quant
        return self

    def __exit__(self, *exc):
        from osengine.quant import observers as quantizers

        quantizers.fake_quant = self.plain


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _per_linear(model, loaded, ids):
    """Each quantized linear of the export against ours on the same input (the input ours sees): relative error of
    the outputs, as is and with the int8 clamp aligned. Needs `loaded` to have run once (it decompresses then)."""
    from osengine.quant.layers import FakeQuantLinear

    as_is, aligned, busy, hooks = {}, {}, [], []

    def hook(module, inputs, output, name):
        if busy:
            return
        busy.append(name)
        x = inputs[0]
        theirs = loaded.get_submodule(name)(x)
        as_is[name] = _relative(theirs, output)
        with int8_full_range():
            aligned[name] = _relative(theirs, module(x))
        busy.pop()

    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and m.weight_spec is not None:
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name)))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return as_is, aligned


def _perplexity(logits, ids) -> float:
    import torch

    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(loss.exp())


def check(recipe_name: str, args) -> dict:
    import torch
    import transformers

    from osengine import api
    from osengine.io.export import export_compressed_tensors

    transformers.logging.set_verbosity_error()
    recipe = EXTRA_RECIPES.get(recipe_name, recipe_name)
    model, tokenizer = api.load_model(args.model)
    text = WIKI_TEST.read_text(encoding="utf-8")[: args.tokens * 20]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        fp = model(input_ids=ids).logits
    t0 = time.time()
    options = {"max_grid_steps": args.grid_steps} if args.strategy == "osplus" else {}
    api.quantize(model, recipe=recipe, strategy=args.strategy, calibration=str(WIKI_CALIB), tokenizer=tokenizer,
                 n_samples=args.samples, seq_len=args.seq_len, batch_size=2, strategy_options=options, progress=False)
    t_quant = time.time() - t0
    if args.weights_only:   # the export carries the weights alone: compare with our model's activations in float
        from osengine.quant.observers import ActQuantizer

        for m in model.modules():
            if isinstance(m, ActQuantizer):
                m.mode = "off"
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        with int8_full_range():
            ours_int8_range = model(input_ids=ids).logits
    work = Path(tempfile.mkdtemp(prefix="osengine-export-check-"))
    out = Path(args.out) / recipe_name if args.out else work / "ct"
    try:
        t0 = time.time()
        summary = export_compressed_tensors(model, tokenizer, out, overwrite=True, weights_only=args.weights_only)
        t_export = time.time() - t0
        size_mib = sum(p.stat().st_size for p in out.iterdir()) / 2 ** 20
        t0 = time.time()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        t_load = time.time() - t0
        with torch.no_grad():
            theirs = loaded(input_ids=ids).logits
            per_linear = _per_linear(model, loaded, ids)
            # The noise floor of end-to-end logits: our own model with its input embeddings scaled by 1 + 1e-6.
            # A quantized deep model amplifies any float-level difference (one activation code flipping at a
            # rounding tie, a different summation order) through the following layers' rounding decisions.
            nudged = model(inputs_embeds=model.get_input_embeddings()(ids) * (1 + 1e-6)).logits
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": args.model, "strategy": args.strategy, "recipe": recipe_name, "scheme": summary["scheme"],
            "tensor_parallel_sizes": summary["tensor_parallel_sizes"], "tokens": int(ids.shape[1]),
            "calibration": f"{args.samples} x {args.seq_len} tokens of {WIKI_CALIB.name}"
                           + (f", OS+ grid {args.grid_steps}" if args.strategy == "osplus" else ""),
            "rel_err_export_vs_ours": _relative(theirs, ours),
            "rel_err_export_vs_ours_int8_range": _relative(theirs, ours_int8_range),
            "rel_err_ours_vs_ours_nudged": _relative(nudged, ours),
            "per_linear_max_rel_err": max(per_linear[0].values()),
            "per_linear_median_rel_err": sorted(per_linear[0].values())[len(per_linear[0]) // 2],
            "per_linear_max_rel_err_int8_range": max(per_linear[1].values()),
            "worst_linear": max(per_linear[0], key=per_linear[0].get),
            "rel_err_ours_vs_fp": _relative(ours, fp),
            "rel_err_export_vs_fp": _relative(theirs, fp),
            "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()),
            "ppl_fp": _perplexity(fp, ids), "ppl_ours": _perplexity(ours, ids), "ppl_export": _perplexity(theirs, ids),
            "quantized_linears": summary["quantized_linears"], "export_mib": size_mib,
            "quantize_seconds": t_quant, "export_seconds": t_export, "load_seconds": t_load}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["w8a8-static", "w8a8-static-restricted", "w8a8-token"],
                   help=f"presets or {', '.join(EXTRA_RECIPES)}")
    p.add_argument("--strategy", default="osplus")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grid-steps", type=int, default=50, help="OS+ max_grid_steps (as benchmarks/accuracy.py)")
    p.add_argument("--tokens", type=int, default=512, help="WikiText-2 test tokens whose logits are compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights-only", action="store_true",
                   help="export the weights alone (W4A16 / W8A16) and compare with our model's activations in float")
    p.add_argument("--out", help="keep the exported folders here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="one JSON object per recipe")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for path in (WIKI_TEST, WIKI_CALIB):
        if not path.is_file():
            raise SystemExit(f"{path} is missing (set OSENGINE_DATA to the folder holding wikitext-2*)")
    rows = []
    for name in args.recipes:
        row = check(name, args)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        import compressed_tensors
        import transformers

        print(f"compressed-tensors export of {args.model} ({args.strategy}), loaded with transformers "
              f"{transformers.__version__} + compressed-tensors {compressed_tensors.__version__}; "
              f"{rows[0]['tokens']} WikiText-2 test tokens "
              f"(calibration: {rows[0]['calibration']})\n")
        print("| recipe (scheme) | per linear, max (median) | same, int8 clamp at -128 | logits "
              "| same, int8 clamp at -128 "
              "| logits noise floor | top-1 agree | osengine vs FP | ppl FP | ppl osengine | ppl export | size MiB "
              "| quantize s | export s | load s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['recipe']} ({r['scheme']}) | {r['per_linear_max_rel_err']:.1e} "
                  f"({r['per_linear_median_rel_err']:.0e}) | "
                  f"{r['per_linear_max_rel_err_int8_range']:.1e} | {r['rel_err_export_vs_ours']:.2e} | "
                  f"{r['rel_err_export_vs_ours_int8_range']:.2e} | {r['rel_err_ours_vs_ours_nudged']:.2e} | "
                  f"{r['top1_agreement']:.4f} | "
                  f"{r['rel_err_ours_vs_fp']:.2e} | {r['ppl_fp']:.2f} | {r['ppl_ours']:.2f} | {r['ppl_export']:.2f} | "
                  f"{r['export_mib']:.0f} | {r['quantize_seconds']:.0f} | {r['export_seconds']:.1f} | "
                  f"{r['load_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

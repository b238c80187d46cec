"""Does the engine-backed model compute what the fake-quant model simulates? (SmolLM2-135M; not a CI test.)

Quantizes the model (default: minmax w8a8-static, a cheap calibration; --strategy osplus for the real thing), converts
a copy to the engine (convert_to_engine) and reports, on WikiText-2 test tokens:
  per_linear     every quantized linear on identical inputs: engine vs fake quant (relative error; the arithmetic)
  noise_floor    how far the fake-quant model's own logits move when its input embeddings are scaled by 1 + 1e-6
                 (static quantization rounds at hard boundaries, so a model can be chaotic in its inputs)
  logits         whole-model engine (as deployed: convert_to_engine's fusions) vs fake-quant logits, and whether
                 64 greedy tokens are identical
  integer_exact  the same against the integer-exact fake quant (quant.layers.set_integer_exact: the engine's integer
                 accumulation and epilogue computed in torch, float for float; osengine.quant.integer_exact): with the
                 engine model's RMSNorm and SiLU in torch (convert_to_engine(fuse=False)), and as deployed, the
                 RMSNorms and SiLU gates folded into the quantize kernels simulated in the kernels' arithmetic
                 (runtime.simulate.simulate_folded_prologues). Expected: identical logits and tokens in both.

    python benchmarks/engine_check.py [--strategy osplus] [--recipe w8a8-static] [--samples 4]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

import osengine
from osengine import api
from osengine.quant.layers import FakeQuantLinear, set_integer_exact
from osengine.runtime.convert import convert_to_engine, engine_linear_from_fake_quant
from osengine.runtime.simulate import simulate_folded_prologues

DATA = Path(os.environ.get("OSENGINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w8a8-static")
    p.add_argument("--strategy", default="minmax")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = api.load_model(args.model)
    calib = (DATA / "wikitext-2" / "valid.txt").read_text()[:400_000]
    osengine.quantize(model, recipe=args.recipe, strategy=args.strategy, calibration=[calib], tokenizer=tok,
                      n_samples=args.samples, seq_len=512, batch_size=2, progress=False)
    test = (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:40_000]
    ids = tok(test, return_tensors="pt").input_ids[:, :args.tokens]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0].clone(), o.clone())))
             for n, m in model.named_modules() if isinstance(m, FakeQuantLinear) and m.weight_spec is not None]
    with torch.inference_mode():
        logits = model(ids).logits
        for h in hooks:
            h.remove()
        per_linear = sorted((rel(engine_linear_from_fake_quant(n, m)(seen[n][0]), seen[n][1]), n)
                            for n, m in model.named_modules() if n in seen)
        moved = model(inputs_embeds=model.get_input_embeddings()(ids) * (1 + 1e-6)).logits
        prompt = tok("The history of the city begins", return_tensors="pt").input_ids
        gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)

        def compare(reference_logits, reference_tokens, other):
            other_logits, tokens = other(ids).logits, other.generate(prompt, **gen)
            same = bool(torch.equal(tokens, reference_tokens))
            return {"logits_rel_err": rel(other_logits, reference_logits),
                    "logits_identical": bool(torch.equal(other_logits, reference_logits)),
                    "greedy_64_identical": same, "greedy_first_difference": None if same else
                    int((tokens != reference_tokens).nonzero()[0, 1]) - prompt.shape[1]}

        engine = convert_to_engine(copy.deepcopy(model))
        deployed = compare(logits, model.generate(prompt, **gen), engine)
        exact = copy.deepcopy(model)
        set_integer_exact(exact)
        unfused = convert_to_engine(copy.deepcopy(model), fuse=False)
        simulate_folded_prologues(exact, unfused)  # no prologues folded yet; the engine's (the runtime's) attention
        exact_logits = exact(ids).logits
        integer_exact = {
            "vs_float_simulation_logits_rel_err": rel(exact_logits, logits),
            "engine_unfused": compare(exact_logits, exact.generate(prompt, **gen), unfused)}
        integer_exact["prologues_simulated"] = simulate_folded_prologues(exact, engine)
        integer_exact["engine_deployed"] = compare(exact(ids).logits, exact.generate(prompt, **gen), engine)
    print(json.dumps({
        "model": args.model, "recipe": args.recipe, "strategy": args.strategy, "tokens": int(ids.shape[1]),
        "per_linear_max_rel_err": per_linear[-1][0], "per_linear_worst_layer": per_linear[-1][1],
        "per_linear_median_rel_err": per_linear[len(per_linear) // 2][0], "linears": len(per_linear),
        "noise_floor_rel": rel(moved, logits), **deployed, "integer_exact": integer_exact}))

if __name__ == "__main__":
    main()

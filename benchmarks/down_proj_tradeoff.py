"""The weight-vs-activation trade-off of OS+'s scale at one LLaMA down_proj under w8a8-static (not a CI test).

For a chosen layer, collect the FP inputs of mlp.down_proj (SiLU(gate) * up) on calibration windows, then for a
few thresholds t apply OS+'s scale s_j = max(1, max|X_j| / t), and print the mean squared error per token of the
down_proj output X W^T when only the activations (per-tensor symmetric 8-bit, range (-t, t)), only the weights
(per-output-channel symmetric 8-bit) or both are quantized. docs/accuracy.md quotes its table for layer 11.

    python benchmarks/down_proj_tradeoff.py --layer 11
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

DATA = Path(os.environ.get("OSENGINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def quantize_weight_rows(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / qmax
    return (w / step).round().clamp(-qmax, qmax) * step


def quantize_range(x: torch.Tensor, t: float, bits: int = 8) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    step = t / qmax
    return (x / step).round().clamp(-qmax, qmax) * step


def main() -> None:
    from osengine import api
    from osengine.calibrate.data import text_samples

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=11)
    p.add_argument("--windows", type=int, default=2, help="calibration windows of 512 tokens")
    p.add_argument("--calib", default=str(DATA / "wikitext-2" / "valid.txt"))
    p.add_argument("--t", default="", help="comma-separated thresholds (default: max, 200, 100, 50, 30, 20, 10, 5)")
    args = p.parse_args()

    model, tok = api.load_model(args.model)
    down = model.model.layers[args.layer].mlp.down_proj
    inputs = []
    hook = down.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    ids = text_samples(Path(args.calib).read_text(encoding="utf-8"), tok, args.windows, 512)
    with torch.no_grad():
        for i in range(args.windows):
            model(ids[i:i + 1])
    hook.remove()
    x = torch.cat(inputs).float()
    w = down.weight.detach().float()
    ref = x @ w.T
    amax = x.abs().amax(0).clamp(min=1e-8)
    energy = (ref ** 2).sum(-1)
    print(f"layer {args.layer} down_proj input: max |x| {float(amax.max()):.1f}, median channel max "
          f"{float(amax.median()):.2f}; output energy per token: median {float(energy.median()):.1f}")
    thresholds = [float(v) for v in args.t.split(",") if v] or [float(amax.max()), 200, 100, 50, 30, 20, 10, 5]
    print("| t | largest s | activation-only error | weight-only error | both |")
    print("|---:|---:|---:|---:|---:|")

    def err(y):
        return float(((y - ref) ** 2).sum(-1).mean())

    for t in thresholds:
        s = (amax / t).clamp(min=1.0)
        xs, ws = x / s, w * s
        xq, wq = quantize_range(xs, t), quantize_weight_rows(ws)
        errors = " | ".join(f"{err(y):.1f}" for y in (xq @ ws.T, xs @ wq.T, xq @ wq.T))
        print(f"| {t:.0f} | {float(s.max()):.1f} | {errors} |")


if __name__ == "__main__":
    main()

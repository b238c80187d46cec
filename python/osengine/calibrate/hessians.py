"""GPTQ's inputs: each linear's calibration Hessian H = sum x x^T, and the GPTQ rounding of a whole block."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..plugins.api import Reduction
from ..quant.gptq import gptq_quantize_weight
from ..quant.hadamard import hadamard_transform
from ..quant.layers import FakeQuantLinear
from ..quant.recipes import Recipe
from ..quant.spec import quantize_weight
from .blocks import run_block


@torch.no_grad()
def collect_hessians(block: nn.Module, block_name: str, recipe: Recipe, calls: list, masks: list,
                     reduction: Reduction = None) -> dict:
    """For each linear of the block that will be quantized: the sum over the real calibration tokens of x x^T
    (fp32, [in, in]), x being its input as the quantizer will see it (after an online rotation and a runtime
    shift). One pass of the block
    in floating point; linears reading the same tensor (q/k/v, gate/up) share one sum. Batches are summed in float64,
    so that the sum does not depend on its order (several processes: `reduction` adds theirs)."""
    linears = {n: m for n, m in block.named_modules()
               if isinstance(m, FakeQuantLinear) and not recipe.keeps_fp(f"{block_name}.{n}")}
    sums, owner, seen, current_mask = {}, {}, [], [None]

    def hook(m, args, name):
        for other_input, other_shift, other_rotation, other_name in seen:  # the same tensor as a sibling (kept
            # alive, so identity is safe): share its sum
            if other_input is args[0] and other_shift is m.input_shift and other_rotation == m.input_rotation:
                owner[name] = other_name
                return
        seen.append((args[0], m.input_shift, m.input_rotation, name))
        x = args[0] if m.input_rotation is None else hadamard_transform(args[0]).to(args[0].dtype)
        x = x if m.input_shift is None else x - m.input_shift
        mask = current_mask[0]
        rows = x[mask] if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape) else x.reshape(-1, x.shape[-1])
        rows = rows.float()
        sums[name] = sums.get(name, 0) + (rows.T @ rows).double()
        owner[name] = name

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for n, m in linears.items()]
    try:
        for call, mask in zip(calls, masks):
            seen.clear()
            current_mask[0] = mask
            run_block(block, call)
    finally:
        for h in handles:
            h.remove()
    reduction = reduction or Reduction()
    totals = {name: reduction.sum(total).float() for name, total in sums.items()}
    return {n: totals[owner[n]] for n in linears if n in owner}


def gptq_block(block: nn.Module, block_name: str, recipe: Recipe, calls: list, masks: list,
               reduction: Reduction = None) -> tuple:
    """(GPTQ-rounded weights by linear name, report entries): each entry gives the layer's output error
    sum ||(W - Q) x||^2 over the calibration tokens for round-to-nearest and for GPTQ, relative to sum ||W x||^2."""
    hessians = collect_hessians(block, block_name, recipe, calls, masks, reduction)
    weights, entries = {}, []
    for name, h in hessians.items():
        w = block.get_submodule(name).weight.detach()
        q = gptq_quantize_weight(w, h, recipe.weights)
        energy = float(torch.einsum("oi,ij,oj->", w.float(), h, w.float())) or 1.0
        err = {kind: float(torch.einsum("oi,ij,oj->", d, h, d)) / energy
               for kind, d in (("nearest", (w.float() - quantize_weight(w.float(), recipe.weights))),
                               ("gptq", (w.float() - q.float())))}
        weights[name] = q
        entries.append({"block": block_name, "linear": name, "relative_error_nearest": err["nearest"],
                        "relative_error_gptq": err["gptq"]})
    return weights, entries

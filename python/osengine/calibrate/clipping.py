"""Activation observer "search": token-wise clipping ranges chosen by the error of the block's output (the coarse
stage of Outlier Suppression v1)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant.observers import ActQuantizer
from .blocks import run_block


def block_outputs(block: nn.Module, calls: list) -> list:
    return [run_block(block, c) for c in calls]


def _output_error(outputs: list, targets: list, masks: list) -> float:
    """Sum of squared differences over the real tokens of every batch."""
    total = 0.0
    for out, target, mask in zip(outputs, targets, masks):
        diff = (out.float() - target.float())
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            diff = diff[mask]
        total += float(diff.pow(2).sum())
    return total


@torch.no_grad()
def search_clipping(block: nn.Module, block_name: str, sites: list, calls: list, masks: list) -> list:
    """Observer "search": for each static activation quantizer of the block (those reading one site's input as
    one), in the block's order, keep the candidate range (quantiles of the per-token extremes, MinMax first) that
    gives the least squared error of the block's output against the same block with its activations unquantized
    (weights quantized), over the calibration batches. Earlier choices stay in place while later ones are searched.
    Returns one report entry per quantizer group."""
    site_of = {c: s.name for s in sites for c in s.consumers}
    groups: dict = {}
    for name, m in block.named_modules():
        if isinstance(m, ActQuantizer) and not m.spec.dynamic and m.spec.observer == "search":
            owner = name[:-len(".act_quant")] if name.endswith(".act_quant") else name
            key = site_of.get(f"{block_name}.{owner}", owner)
            groups.setdefault(key, []).append((owner, m))
    if not groups:
        return []
    quantizers = [m for m in block.modules() if isinstance(m, ActQuantizer)]
    saved = [m.mode for m in quantizers]
    for m in quantizers:
        m.mode = "off"
    targets = block_outputs(block, calls)
    for m, mode in zip(quantizers, saved):
        m.mode = mode
    entries = []
    for members in groups.values():
        candidates = members[0][1].clip_candidates()
        scored = []  # (block output error, quantile, lo, hi), MinMax first
        for q, lo, hi in candidates:
            for _, m in members:
                m.set_range(lo, hi)
            scored.append((_output_error(block_outputs(block, calls), targets, masks), q, lo, hi))
        err, q, lo, hi = min(scored, key=lambda e: e[0])  # the first of equals: the widest range
        for _, m in members:
            m.set_range(lo, hi)
            m.token_extremes = []
        entries.append({"block": block_name, "quantizers": [owner for owner, _ in members], "quantile": q,
                        "range": (lo, hi), "minmax_range": candidates[0][1:], "output_error": err,
                        "minmax_output_error": scored[0][0]})
    return entries

"""Activation observers: the fake quantizer of an activation, which records calibration ranges (static specs) or
takes them from each input (dynamic specs), and the switches that the calibration driver flips on a whole block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .spec import QuantSpec, centred_codes, dynamic_qparams, fake_quant, qparams_from_range, quantize_dynamic

# Activation "search" observer (token-wise clipping searched by output error, the coarse stage of Outlier Suppression
# v1): candidate ranges are quantiles of the per-token minima and maxima seen during calibration (1.0 = MinMax); the
# calibration driver keeps the candidate that gives the least squared error of the block's output. The paper's grid
# steps the quantile down from 1 by 0.01 over a span that widens as bits drop (0.1 at 8 bits, 0.3 at 6, 0.9 at 4);
# a few finer points near 1 are added for language models, whose extreme tokens are a handful in thousands.
FINE_CLIP_QUANTILES = (0.9999, 0.9995, 0.999, 0.998, 0.995)


def clip_search_quantiles(bits: int) -> tuple:
    """The candidate quantiles of the "search" observer at `bits`, widest (MinMax, 1.0) first."""
    span = 0.1 if bits >= 8 else 0.3 if bits >= 5 else 0.9
    steps = round(span / 0.01)
    return (1.0,) + FINE_CLIP_QUANTILES + tuple(round(1.0 - 0.01 * k, 2) for k in range(1, steps + 1))


class ActQuantizer(nn.Module):
    """Activation fake-quantizer. Static specs observe calibration batches first (mode "observe"), then quantize with
    the frozen range; dynamic specs compute ranges per call. Per-tensor static only (what an int GEMM can use)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.mode = "quantize" if spec.dynamic else "observe"
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("batches", torch.tensor(0))
        self.token_mask: Optional[torch.Tensor] = None   # [batch, tokens] real tokens of the batch being observed
        # Linear inputs [batch, tokens, channels]: the first fp_prefix tokens of every sequence are a full-precision
        # prefix (PrefixQuant's outlier tokens, calibrate/prefix.py): neither quantized nor observed.
        self.fp_prefix = 0
        self.token_extremes: list = []   # observer "search": (per-token minima, maxima) of each observed batch

    def _real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Drop padding tokens before observing: x is [batch, tokens, channels] (linear inputs) or
        [batch, heads, tokens, dim] (BMM inputs)."""
        m = self.token_mask
        if m is None:
            return x
        m = m.to(x.device)
        if self.fp_prefix and x.dim() == 3 and m.shape[1] == x.shape[1] + self.fp_prefix:
            m = m[:, self.fp_prefix:]   # x is the part after the prefix
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m]
        if x.dim() == 4 and x.shape[0] == m.shape[0] and x.shape[2] == m.shape[1]:
            return x.transpose(1, 2)[m]
        return x

    def _observe(self, x: torch.Tensor) -> None:
        x = self._real_tokens(x.detach()).float()
        if self.spec.observer == "search":  # MinMax now; the token extremes feed clip_candidates()
            flat = x.reshape(-1, x.shape[-1])
            self.token_extremes.append((flat.amin(dim=-1).cpu(), flat.amax(dim=-1).cpu()))
        if self.spec.observer == "quantile":
            # token-wise clipping: quantile of per-token extremes, averaged over batches
            flat = x.reshape(-1, x.shape[-1])
            lo = torch.quantile(flat.amin(dim=-1), 1 - self.spec.quantile)
            hi = torch.quantile(flat.amax(dim=-1), self.spec.quantile)
        else:
            lo, hi = x.min(), x.max()
        if self.spec.observer in ("minmax", "search"):
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        else:  # running average of per-batch ranges; each batch is counted exactly once
            n = self.batches.item()
            if n == 0:
                self.lo.copy_(lo)
                self.hi.copy_(hi)
            else:
                self.lo.copy_((self.lo * n + lo) / (n + 1))
                self.hi.copy_((self.hi * n + hi) / (n + 1))
        self.batches += 1

    def clip_candidates(self) -> list:
        """Observer "search": [(quantile, lo, hi)] from the per-token extremes observed, widest (MinMax) first,
        without repeats."""
        if not self.token_extremes:
            raise RuntimeError("clip_candidates() needs calibration batches observed with observer 'search'")
        mins = torch.cat([lo for lo, _ in self.token_extremes])
        maxs = torch.cat([hi for _, hi in self.token_extremes])
        out, seen = [], set()
        for q in clip_search_quantiles(self.spec.bits):
            lo = float(torch.quantile(mins, 1.0 - q)) if q < 1.0 else float(mins.min())
            hi = float(torch.quantile(maxs, q)) if q < 1.0 else float(maxs.max())
            if (lo, hi) not in seen:
                seen.add((lo, hi))
                out.append((q, lo, hi))
        return out

    def set_range(self, lo: float, hi: float) -> None:
        self.lo.fill_(lo)
        self.hi.fill_(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.fp_prefix and x.dim() == 3:
            p = min(self.fp_prefix, x.shape[1])
            return torch.cat([x[:, :p], self._quantize(x[:, p:])], dim=1)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            return quantize_dynamic(x, self.spec)
        if self.mode == "observe":
            self._observe(x)
            return x
        delta, zp = self._static_qparams(x.dtype)
        return fake_quant(x, delta, zp, self.spec)

    def _static_qparams(self, dtype: torch.dtype) -> tuple:
        if not torch.isfinite(self.lo) or not torch.isfinite(self.hi):
            raise RuntimeError("static activation quantizer used before calibration (no finite range observed)")
        return qparams_from_range(self.lo.to(dtype), self.hi.to(dtype), self.spec)

    def codes(self, x: torch.Tensor) -> tuple:
        """(centred integer codes [..., K] as a float tensor, step sizes [..., 1] (per tensor / token) or
        [..., K / group_size] (per group)) of x, what forward() dequantizes: forward(x) == codes * delta."""
        if self.spec.dynamic:
            xg, delta, zp = dynamic_qparams(x, self.spec)
            q = centred_codes(xg, delta, zp, self.spec)
            if self.spec.granularity == "per-group":
                return q.reshape_as(x), delta.squeeze(-1)
            return q, delta.expand(*x.shape[:-1], 1)
        delta, zp = self._static_qparams(x.dtype)
        return centred_codes(x, delta, zp, self.spec), delta.expand(*x.shape[:-1], 1)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, {s.granularity}, dynamic={s.dynamic}, mode={self.mode}"


def set_observing(module: nn.Module, observing: bool) -> None:
    """observing=True: every static activation quantizer under `module` records ranges (dynamic ones quantize);
    False: every quantizer quantizes (this also switches on quantizers that were "off", such as BMM inputs of a
    block not yet calibrated)."""
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.mode = "observe" if observing and not m.spec.dynamic else "quantize"


def checked_prefix(prefix, vocab_size: Optional[int], where: str) -> list:
    """`prefix` as a list of token ids, or ValueError naming `where` unless every id is an integer in
    [0, vocab_size)."""
    ids = list(prefix) if isinstance(prefix, (list, tuple)) else None
    if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and
                              (vocab_size is None or t < vocab_size) for t in ids):
        raise ValueError(f"{where}: prefix token ids must be integers in [0, {vocab_size}), got {prefix!r}")
    return ids


def set_fp_prefix(module: nn.Module, length: int) -> None:
    """Every activation quantizer under `module` leaves the first `length` tokens of each sequence (the
    full-precision prefix) unquantized and unobserved."""
    if length < 0:
        raise ValueError(f"prefix length must be >= 0, got {length}")
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.fp_prefix = int(length)


def set_token_mask(module: nn.Module, mask: Optional[torch.Tensor]) -> None:
    """Tell the activation observers under `module` which tokens of the next batch are real (None: all)."""
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.token_mask = mask

"""GPTQ weight rounding (Frantar et al., ICLR 2023): quantize a linear layer's weight column by column and spread
each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction error, H = sum over calibration tokens of x x^T (x: the layer's input).

The grid (step and zero point per row, group or tensor) is the weight spec's MinMax or MSE range of the original
weight, so a GPTQ weight sits on the same grid as round-to-nearest would use; only the rounding decisions differ.
For symmetric specs each row's (group's) largest-magnitude weight is pinned to its code +-qmax, as round-to-nearest
puts it, so that the codes and the step can be read back from the fake-quantized values alone (the engine
conversion and the exports do so).

Columns are visited in order of decreasing H_jj ("act order": channels with the largest inputs first, while the
most columns remain to absorb their error); the damping is 1% of the mean diagonal, as in the reference.
"""
from __future__ import annotations

import torch

from .spec import QuantSpec, weight_qparams

GPTQ_DAMPING = 0.01      # fraction of the mean Hessian diagonal added to it
GPTQ_BLOCK = 128         # columns updated together (lazy batch updates; changes speed, not the result)


class GPTQError(ValueError):
    """The Hessian does not fit the weight, or is not finite."""


def _column_grid(w: torch.Tensor, spec: QuantSpec) -> tuple:
    """Step and zero point for every weight element ([out, in] each), from the spec's range of the original w,
    and a boolean [out, in] mask of the elements pinned to +-qmax (symmetric specs: each row's / group's largest
    magnitude; none for asymmetric specs)."""
    x, delta, zp = weight_qparams(w, spec)
    delta, zp = delta.expand_as(x).reshape_as(w), zp.expand_as(x).reshape_as(w)
    pinned = torch.zeros_like(w, dtype=torch.bool)
    if spec.symmetric:
        flat = x.abs().reshape(-1, x.shape[-1]) if spec.granularity != "per-tensor" else x.abs().reshape(1, -1)
        first_max = torch.zeros_like(flat, dtype=torch.bool)
        first_max.scatter_(1, flat.argmax(dim=1, keepdim=True), True)
        pinned = first_max.reshape_as(w)
    return delta, zp, pinned


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The fake-quantized weight (dequantized values, w's dtype) that GPTQ chooses for w [out, in], given the
    Hessian [in, in] = sum of x x^T over the layer's calibration inputs."""
    out_features, in_features = w.shape
    if hessian.shape != (in_features, in_features):
        raise GPTQError(f"GPTQ: the Hessian has shape {tuple(hessian.shape)}, expected ({in_features}, {in_features}) "
                        "for a weight with that many input channels")
    if not torch.isfinite(hessian).all():
        raise GPTQError("GPTQ: the Hessian is not finite (NaN or inf in the calibration inputs)")
    original = w.detach().double()
    delta, zp, pinned = _column_grid(original, spec)
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0           # inputs that never fire: their weights cannot matter, quantize as they are
    H[dead, dead] = 1.0
    order = torch.argsort(torch.diag(H), descending=True)
    W = original[:, order].clone()
    delta, zp, pinned = delta[:, order], zp[:, order], pinned[:, order]
    H = H[order][:, order]
    H += GPTQ_DAMPING * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype, device=H.device)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
        U = torch.linalg.cholesky(inverse, upper=True)      # H^-1 = U^T U; row i of U drives column i's update
    except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
        raise GPTQError(f"GPTQ: the damped Hessian is not positive definite ({e})") from None
    pin_code = torch.sign(original[:, order]) * spec.qmax
    Q = torch.empty_like(W)
    for start in range(0, in_features, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, in_features)
        errors = torch.empty(out_features, end - start, dtype=W.dtype, device=W.device)
        for j in range(start, end):
            col, d, z = W[:, j], delta[:, j], zp[:, j]
            code = torch.clamp(torch.round(col / d) + z, spec.qmin, spec.qmax) - z
            code = torch.where(pinned[:, j], pin_code[:, j], code)
            Q[:, j] = code * d
            err = (col - Q[:, j]) / U[j, j]
            W[:, j + 1:end] -= err[:, None] * U[j, j + 1:end][None, :]
            errors[:, j - start] = err
        W[:, end:] -= errors @ U[start:end, end:]
    result = torch.empty_like(Q)
    result[:, order] = Q
    if spec.symmetric:
        # The values round-to-nearest would store: code x step with the step computed in w's precision, so that
        # the codes and scales read back from the saved weight (symmetric_weight_codes) reproduce it exactly.
        step, _, _ = _column_grid(w.detach().float(), spec)
        codes = torch.round(result / _column_grid(original, spec)[0])
        return (codes.float() * step).to(w.dtype)
    return result.to(w.dtype)

"""Rotating a model's residual stream (QuaRot, Ashkboos et al. 2024), exact in floating point.

Every vector the residual stream carries becomes X Q for an orthogonal Q (a randomized Hadamard matrix), which spreads
a few outlier channels over all channels before the linears that read the stream quantize it:
    1. a tied lm_head is untied (it absorbs the final norm's weight; the embeddings do not)
    2. LayerNorm models (layout.centered): the mean subtraction is folded out — the embedding rows and every writer's
       output are centred, so the stream has zero mean and each LayerNorm computes x / rms(x) * g + b
    3. each norm's weight g (and bias b) is folded into its readers: W <- W diag(g), bias <- bias + W b; the norm
       keeps a weight of ones (LayerNorms become RMSNorms, which commute with Q because rms(x Q) = rms(x))
    4. Q is folded in: embedding rows and readers' weights W <- W Q (inputs), writers W <- Q^T W and their biases
       b <- b Q (outputs), lm_head W <- W Q
    5. per attention head, the values are rotated by a Hadamard matrix H_d (v_proj rows, out projection columns)
    6. online: the MLP down projection (layout.online) and, with online="all", the attention output projection
       (layout.online_attention: a rotation across the heads too) get W <- W H / sqrt(K) and rotate their input by
       H / sqrt(K) at run time (FakeQuantLinear.input_rotation, fused into the engine's quantization)
All products run in float64 and are cast back once.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..plugins.api import Architecture, PluginError, RotationLayout
from ..quant.hadamard import HadamardError, check_supported, hadamard_matrix, random_hadamard
from ..quant.layers import FakeQuantLinear, RMSNorm


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.data = value.to(param.dtype).contiguous()


def _add_bias(linear: nn.Module, value: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(value.to(linear.weight.dtype), requires_grad=False)
    else:
        _set(linear.bias, value)


def _bias64(linear: nn.Module) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(linear.weight.shape[0], dtype=torch.float64, device=linear.weight.device)
    return linear.bias.double()


def _head_dim(model: nn.Module, value: nn.Module) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = config.hidden_size // config.num_attention_heads
    if value.weight.shape[0] % head_dim:
        raise PluginError(f"rotation: the value projection's {value.weight.shape[0]} outputs are not whole heads of "
                          f"{head_dim}")
    return int(head_dim)


def check_rotatable(model: nn.Module, arch: Architecture, online: str = "all") -> RotationLayout:
    """The architecture's rotation layout, with every size checked (a clear error before anything changes)."""
    layout = arch.rotation_layout(model)
    if layout is None:
        raise PluginError(f"strategy rotate: architecture {arch.name} does not describe its residual stream "
                          "(Architecture.rotation_layout); rotations are available for llama, mistral, qwen2 and opt")
    hidden = model.get_submodule(layout.embeddings[0]).weight.shape[1]
    try:
        check_supported(hidden, f"strategy rotate: the residual stream of {hidden} channels")
        if layout.value_output is not None:
            block = model.get_submodule(arch.blocks(model)[0])
            head = _head_dim(model, block.get_submodule(layout.value_output[0]))
            check_supported(head, f"strategy rotate: the attention heads of {head} channels")
        for name in arch.blocks(model)[:1]:
            for linear in _online_linears(layout, online):
                k = model.get_submodule(f"{name}.{linear}").in_features
                check_supported(k, f"strategy rotate: the online rotation of {linear}'s {k} inputs")
    except HadamardError as e:
        raise PluginError(str(e)) from None
    return layout


@torch.no_grad()
def _untie_lm_head(model: nn.Module, layout: RotationLayout) -> bool:
    head = model.get_submodule(layout.lm_head)
    embedding = model.get_submodule(layout.embeddings[0])
    if head.weight is not embedding.weight and head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def _center(model: nn.Module, layout: RotationLayout, blocks: list) -> None:
    """Fold LayerNorm's mean subtraction into what writes the stream: each contribution gets zero mean."""
    for name in layout.embeddings:
        w = model.get_submodule(name).weight
        _set(w, w.double() - w.double().mean(dim=1, keepdim=True))
    for block in blocks:
        for name in layout.writers:
            lin = block.get_submodule(name)
            _set(lin.weight, lin.weight.double() - lin.weight.double().mean(dim=0, keepdim=True))
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() - lin.bias.double().mean())


@torch.no_grad()
def _fold_norm(parent: nn.Module, norm_name: str, readers: list, centered: bool) -> None:
    """Fold norm's weight (and bias) into its readers; the norm keeps ones (a LayerNorm becomes an RMSNorm)."""
    norm = parent.get_submodule(norm_name)
    g = norm.weight.double()
    b = getattr(norm, "bias", None)
    for lin in readers:
        w = lin.weight.double()
        if b is not None:
            _add_bias(lin, _bias64(lin) + w @ b.double())
        _set(lin.weight, w * g)
    if centered:
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))
        replacement = RMSNorm(g.numel(), eps).to(norm.weight.device)
        parent.set_submodule(norm_name, replacement)
    else:
        if b is not None:
            raise PluginError(f"rotation: norm {norm_name} has a bias; only LayerNorm models (centered layouts) "
                              "can fold one")
        _set(norm.weight, torch.ones_like(g))


ONLINE_CHOICES = ("down", "all", "none")


def _online_linears(layout: RotationLayout, online: str) -> tuple:
    if online not in ONLINE_CHOICES:
        raise PluginError(f"rotation: online must be one of {ONLINE_CHOICES}, got {online!r}")
    if online == "none":
        return ()
    extra = (layout.online_attention,) if online == "all" and layout.online_attention else ()
    return extra + tuple(layout.online)


@torch.no_grad()
def rotate_model(model: nn.Module, arch: Architecture, seed: int = 0, heads: bool = True,
                 online: str = "all") -> dict:
    """Rotate the residual stream of `model` in place (module docstring); returns the record kept in the report
    and the saved folder. online: which linears rotate their input at run time — "down" (the MLP down
    projection), "all" (also the attention output projection) or "none"."""
    layout = check_rotatable(model, arch, online)
    online_names = _online_linears(layout, online)
    blocks = [model.get_submodule(n) for n in arch.blocks(model)]
    untied = _untie_lm_head(model, layout) if layout.lm_head else False
    if layout.centered:
        _center(model, layout, blocks)
    for block in blocks:
        for nr in layout.norms:
            _fold_norm(block, nr.norm, [block.get_submodule(r) for r in nr.readers], layout.centered)
    if layout.final_norm and layout.lm_head:
        _fold_norm(model, layout.final_norm, [model.get_submodule(layout.lm_head)], layout.centered)
    elif layout.final_norm:
        raise PluginError("rotation: a model without an lm_head cannot absorb its final norm; rotate the causal LM")
    hidden = model.get_submodule(layout.embeddings[0]).weight.shape[1]
    device = model.get_submodule(layout.embeddings[0]).weight.device
    q = random_hadamard(hidden, seed).to(device)
    for name in layout.embeddings:
        w = model.get_submodule(name).weight
        _set(w, w.double() @ q)
    readers = [model.get_submodule(layout.lm_head)] if layout.lm_head else []
    head_dim, online_layers = None, []
    for block_name, block in zip(arch.blocks(model), blocks):
        readers += [block.get_submodule(r) for nr in layout.norms for r in nr.readers]
        for name in layout.writers:
            lin = block.get_submodule(name)
            _set(lin.weight, q.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ q)
        if heads and layout.value_output is not None:
            value, output = (block.get_submodule(n) for n in layout.value_output)
            head_dim = _head_dim(model, value)
            h = random_hadamard(head_dim, seed + 1).to(device)
            wv = value.weight.double().reshape(-1, head_dim, value.in_features)
            _set(value.weight, torch.einsum("dk,hdi->hki", h, wv).reshape(value.weight.shape))
            if value.bias is not None:
                _set(value.bias, (value.bias.double().reshape(-1, head_dim) @ h).reshape(-1))
            wo = output.weight.double().reshape(output.out_features, -1, head_dim)
            _set(output.weight, (wo @ h).reshape(output.weight.shape))
        for name in online_names:
            lin = block.get_submodule(name)
            _set(lin.weight, lin.weight.double() @ hadamard_matrix(lin.in_features).to(device))
            if not isinstance(lin, FakeQuantLinear):
                lin = FakeQuantLinear(lin)
                block.set_submodule(name, lin)
            lin.set_input_rotation("hadamard")
            online_layers.append(f"{block_name}.{name}")
    for lin in readers:
        _set(lin.weight, lin.weight.double() @ q)
    return {"kind": "hadamard", "seed": int(seed), "residual_channels": int(hidden),
            "head_channels": head_dim, "online": online_layers, "lm_head_untied": untied,
            "layernorms_replaced": bool(layout.centered)}

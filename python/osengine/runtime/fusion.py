"""Fusion in an engine-backed model: linears that read one input (q/k/v, gate/up: the consumers of one migration site)
computed as one layer, and the modules before them folded into that layer's activation quantization (an RMSNorm, the
SiLU gate of a gated MLP), as the model's architecture plugin declares (Architecture.rmsnorm_eps_attribute,
Architecture.gated_mlp). Every output is computed exactly as without fusion; the fused model makes fewer, larger
calls and never writes the normalized or gated activations out in fp32.
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch
import torch.nn as nn

from ..plugins.api import GatedMLP, PluginError
from ..plugins.registry import resolve_architecture
from .linear import EngineLinear, Prologue

# ----------------------------------------------------------------------------------------------------------------
# Linears that read the same input
# ----------------------------------------------------------------------------------------------------------------


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def can_fuse(members: List[EngineLinear]) -> bool:
    """Members read the same input; they can share one quantization when their activation quantizers are the same
    (dynamic per token: the same by construction; static: calibrated on the same tensor, hence the same range)."""
    first = members[0]
    for m in members:
        if not isinstance(m, EngineLinear) or m.group is not None or m.packed is None:
            return False
        same_config = (m.in_features, m.weight_bits, m.weight_group_size, m.act_bits, m.act_symmetric, m.act_dynamic,
                       m.act_group_size, m.packed.backend, m.separate_shift, m.input_rotation) == (
            first.in_features, first.weight_bits, first.weight_group_size, first.act_bits, first.act_symmetric,
            first.act_dynamic, first.act_group_size, first.packed.backend, first.separate_shift, first.input_rotation)
        if not same_config or not all(_same(getattr(m, b), getattr(first, b)) for b in
                                      ("act_scale", "act_zero_point", "input_shift", "input_smooth_scale")):
            return False
    return True


class FusedGroup:
    """EngineLinears that read one input (they must satisfy can_fuse), computed by one EngineLinear over their
    concatenated weights (`layer`): one activation quantization and one GEMM per input. Each member returns its
    columns of the fused output and releases its own packed weights."""

    def __init__(self, members: List[EngineLinear]):
        if not can_fuse(members):
            raise ValueError("FusedGroup: the members must be unfused EngineLinears with the same input quantization")
        first = members[0]
        codes = torch.cat([m.weight_codes() for m in members])
        w_scale = torch.cat([m.w_scale.expand(m.out_features) if m.w_scale.numel() == 1 else m.w_scale
                             for m in members])
        bias = None
        if any(m.bias is not None for m in members):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=m.w_scale.device)
                              for m in members])
        self.layer = EngineLinear(codes.to(first.w_scale.device), w_scale, bias, weight_bits=first.weight_bits,
                                  weight_group_size=first.weight_group_size, act_bits=first.act_bits,
                                  act_symmetric=first.act_symmetric, act_dynamic=first.act_dynamic,
                                  act_group_size=first.act_group_size, act_scale=first.act_scale,
                                  act_zero_point=first.act_zero_point, input_shift=first.input_shift,
                                  input_smooth_scale=first.input_smooth_scale, backend=first.packed.backend,
                                  input_rotation=first.input_rotation)
        self.members = list(members)
        self._cache = None  # (input, input version, output, members served)
        lo = 0
        for m in members:
            m.join_group(self, (lo, lo + m.out_features))
            lo += m.out_features

    def output(self, x: torch.Tensor, member: EngineLinear) -> torch.Tensor:
        """member's columns of the fused output for input x; computed once per input tensor (identity and in-place
        version checked where torch keeps one: not for inference-mode tensors) for all members."""
        cache = self._cache
        if cache is None or cache[0] is not x or member in cache[3] or (
                cache[1] is not None and cache[1] != x._version):
            version = None if x.is_inference() else x._version  # inference tensors keep no version counter
            cache = self._cache = (x, version, self.layer(x), [])
        cache[3].append(member)
        if len(cache[3]) >= len(self.members):
            self._cache = None  # every member served: release the input and the output
        lo, hi = member.columns
        return cache[2][..., lo:hi]


def fuse_shared_inputs(model: nn.Module) -> int:
    """Fuse the EngineLinears that read one input, as the model's architecture plugin describes them (the consumers of
    each migration site), and fold what the plugin declares foldable into the fused layers' quantization; returns how
    many groups were fused. Models without an architecture plugin are left as they are."""
    try:
        arch = resolve_architecture(model)
        blocks = arch.blocks(model)
    except PluginError:
        return 0
    fused = 0
    for index, block in enumerate(blocks):
        for site in arch.sites(model, index):
            try:
                members = [model.get_submodule(name) for name in site.consumers]
            except AttributeError:
                continue
            if len(members) < 2 or not can_fuse(members):
                continue
            group = FusedGroup(members)
            fused += 1
            if site.producer_kind == "rmsnorm" and arch.rmsnorm_eps_attribute:
                fold_norm_into_quantizer(model.get_submodule(site.producer), group.layer, arch.rmsnorm_eps_attribute)
            mlp = arch.gated_mlp
            if mlp is not None and list(site.consumers) == [f"{block}.{mlp.module}.{mlp.gate}",
                                                            f"{block}.{mlp.module}.{mlp.up}"]:
                fold_gate_into_down_proj(model.get_submodule(f"{block}.{mlp.module}"), group, mlp)
    return fused


# ----------------------------------------------------------------------------------------------------------------
# Prologues: the module before a layer folded into its activation quantization
# ----------------------------------------------------------------------------------------------------------------

# Plain attributes on the modules whose work a reader took over (outside the module tree and the state dict)
NORM_READER_TAG = "_osengine_norm_reader"           # on a folded norm: the EngineLinear that normalizes
GATE_READER_TAG = "_osengine_gate_reader"           # on a folded MLP: the down EngineLinear that gates
GATE_ACTIVATION_TAG = "_osengine_gate_activation"   # on a folded MLP: the name of its activation attribute


def _passthrough(self, hidden_states):
    """Forward of a norm folded into the quantization of its only reader: the reader normalizes."""
    return hidden_states


def fold_norm_into_quantizer(norm: nn.Module, layer: EngineLinear, eps_attribute: str = "variance_epsilon") -> bool:
    """Let `layer` (a fused EngineLinear that is the only reader of `norm`'s output: the q/k/v or gate/up of a
    LLaMA-family block) apply the RMSNorm inside its activation quantization, and make `norm` pass its input through:
    the normalized activations are then never written out in fp32 (one pass instead of six). `norm` must compute
    weight * (x * rsqrt(mean(x^2) + eps)) in fp32, eps being its `eps_attribute` (the architecture plugin says so).
    CPU backends only; returns whether it folded. The norm keeps its weight (state dict unchanged); unfold_norms
    undoes it."""
    if layer.packed is None or layer.packed.backend == "cuda":
        return False
    weight, eps = getattr(norm, "weight", None), getattr(norm, eps_attribute, None)
    if weight is None or eps is None or weight.device.type != "cpu" or weight.shape != (layer.in_features,):
        return False
    layer.set_prologue(Prologue(rms_norm=(weight, float(eps))))
    _install(norm, _passthrough, NORM_READER_TAG, layer)
    return True


def _gated_forward(down: str, layer: EngineLinear):
    def forward(self, x):
        """Forward of a gated MLP whose act(gate) * up is folded into down's quantization: down reads [gate | up]."""
        return getattr(self, down)(layer(x))
    return forward


def _is_silu(module) -> bool:
    return type(module).__name__ in ("SiLU", "SiLUActivation")


def fold_gate_into_down_proj(mlp: nn.Module, gate_up: FusedGroup, spec: Optional[GatedMLP] = None) -> bool:
    """Let the MLP's down linear compute silu(gate) * up inside its activation quantization, reading the fused
    gate/up group's whole output [gate | up]: the product is never written out in fp32 (one pass instead of three).
    A down linear with an online input rotation (QuaRot's) rotates silu(gate) * up in the same kernel, after the
    product. `spec` names the MLP's linears and activation (default: LLaMA's). CPU backends and a SiLU activation
    only; returns whether it folded; unfold_gates undoes it."""
    spec = spec or GatedMLP()
    down = getattr(mlp, spec.down, None)
    gate, up = getattr(mlp, spec.gate, None), getattr(mlp, spec.up, None)
    layer = gate_up.layer
    if (not _is_silu(getattr(mlp, spec.activation, None))
            or not isinstance(down, EngineLinear) or down.group is not None or down.packed is None
            or down.packed.backend == "cuda" or layer.packed is None or layer.packed.backend == "cuda"
            or gate_up.members != [gate, up]
            or gate.columns != (0, down.in_features) or up.columns != (down.in_features, 2 * down.in_features)):
        return False
    down.set_prologue(Prologue(silu_gate=True))
    _install(mlp, _gated_forward(spec.down, layer), GATE_READER_TAG, down)
    object.__setattr__(mlp, GATE_ACTIVATION_TAG, spec.activation)  # where the simulation puts the engine's SiLU
    return True


def unfold_gates(model: nn.Module) -> int:
    """Undo fold_gate_into_down_proj everywhere in `model`."""
    for m in model.modules():
        m.__dict__.pop(GATE_ACTIVATION_TAG, None)
    return _unfold(model, GATE_READER_TAG)


def unfold_norms(model: nn.Module) -> int:
    """Undo fold_norm_into_quantizer everywhere in `model` (norms compute again, their readers stop normalizing)."""
    return _unfold(model, NORM_READER_TAG)


def _install(module: nn.Module, forward, tag: str, reader: EngineLinear) -> None:
    """Give `module` its folded forward (an instance attribute: it shadows the class's forward) and remember the
    EngineLinear that now does its work (a plain attribute, outside the module tree) under `tag`."""
    module.forward = types.MethodType(forward, module)
    object.__setattr__(module, tag, reader)


def _unfold(model: nn.Module, tag: str) -> int:
    """Remove the folded forward of every module tagged `tag` and give its reader back a plain prologue."""
    count = 0
    for m in model.modules():
        reader = m.__dict__.pop(tag, None)
        if reader is not None:
            m.__dict__.pop("forward", None)
            reader.set_prologue(Prologue())
            count += 1
    return count

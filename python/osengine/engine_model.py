"""Model-level pieces of an engine-backed model: fused shared-input linears (with the RMSNorm that feeds them folded
into their activation quantization), an int8 embedding table (and lm_head on the engine), and the model's memory as
the engine holds it.

`convert_to_engine(model, fuse=..., quantize_embeddings=...)` calls these; they can also be applied to a model that
already runs EngineLinears.
"""
from __future__ import annotations

import types
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn

from . import engine_arithmetic
from .engine_linear import EngineLinear


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
        if not isinstance(m, EngineLinear) or m._fused is not None or m.packed is None:
            return False
        same_config = (m.in_features, m.weight_bits, m.weight_group_size, m.act_bits, m.act_symmetric, m.act_dynamic,
                       m.act_group_size, m.packed.backend, m.separate_shift) == (
            first.in_features, first.weight_bits, first.weight_group_size, first.act_bits, first.act_symmetric,
            first.act_dynamic, first.act_group_size, first.packed.backend, first.separate_shift)
        if not same_config or not all(_same(getattr(m, b), getattr(first, b)) for b in
                                      ("act_scale", "act_zero_point", "input_shift", "input_smooth_scale")):
            return False
    return True


def fuse_linears(members: List[EngineLinear]) -> EngineLinear:
    """One EngineLinear over the concatenated weights of `members` (which must satisfy can_fuse); each member then
    returns its columns of the fused output and releases its own packed weights."""
    first = members[0]
    codes = torch.cat([m.weight_codes() for m in members])
    w_scale = torch.cat([m.w_scale.expand(m.out_features) if m.w_scale.numel() == 1 else m.w_scale for m in members])
    bias = None
    if any(m.bias is not None for m in members):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=m.w_scale.device)
                          for m in members])
    device = first.w_scale.device
    fused = EngineLinear(codes.to(device), w_scale, bias, weight_bits=first.weight_bits,
                         weight_group_size=first.weight_group_size, act_bits=first.act_bits,
                         act_symmetric=first.act_symmetric, act_dynamic=first.act_dynamic,
                         act_group_size=first.act_group_size, act_scale=first.act_scale,
                         act_zero_point=first.act_zero_point, input_shift=first.input_shift,
                         input_smooth_scale=first.input_smooth_scale, backend=first.packed.backend)
    fused._n_members = len(members)
    lo = 0
    for m in members:
        # plain attributes (not submodules): the fused layer is no part of the module tree or the state dict
        object.__setattr__(m, "_fused", fused)
        m._fused_columns = (lo, lo + m.out_features)
        m.packed = None
        m._fast = None
        lo += m.out_features
    return fused


def fuse_shared_inputs(model: nn.Module) -> int:
    """Fuse the EngineLinears of each migration site of the model's architecture (the linears that read one
    activation: q/k/v, gate/up); returns how many groups were fused. Models without an architecture plugin are left
    as they are."""
    from .plugin_api import PluginError, resolve_architecture

    try:
        arch = resolve_architecture(model)
        blocks = arch.blocks(model)
    except PluginError:
        return 0
    fused = 0
    for index in range(len(blocks)):
        for site in arch.sites(model, index):
            try:
                members = [model.get_submodule(name) for name in site.consumers]
            except AttributeError:
                continue
            if len(members) > 1 and can_fuse(members):
                layer = fuse_linears(members)
                fused += 1
                if site.producer_kind == "rmsnorm":
                    fold_norm_into_quantizer(model.get_submodule(site.producer), layer)
                parent = site.consumers[0].rpartition(".")[0]
                if [n.rpartition(".")[2] for n in site.consumers] == ["gate_proj", "up_proj"]:
                    fold_gate_into_down_proj(model.get_submodule(parent), layer)
    return fused


# RMSNorms computed as weight * (x * rsqrt(mean(x^2) + eps)) in fp32: what the fused quantize kernel does.
FOLDABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _passthrough(self, hidden_states):
    """Forward of a norm folded into the quantization of its only reader: the reader normalizes."""
    return hidden_states


def fold_norm_into_quantizer(norm: nn.Module, layer: EngineLinear) -> bool:
    """Let `layer` (a fused EngineLinear that is the only reader of `norm`'s output: the q/k/v or gate/up of a
    LLaMA-family block) apply the RMSNorm inside its activation quantization, and make `norm` pass its input through:
    the normalized activations are then never written out in fp32 (one pass instead of six). CPU backends and
    the RMSNorm classes of FOLDABLE_NORMS only; returns whether it folded. The norm keeps its weight (state dict
    unchanged); unfold_norms undoes it."""
    if type(norm).__name__ not in FOLDABLE_NORMS or layer.packed is None or layer.packed.backend == "cuda":
        return False
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if weight is None or eps is None or weight.device.type != "cpu" or weight.shape != (layer.in_features,):
        return False
    layer.pre_norm = (weight, float(eps))
    _install(norm, _passthrough, "_osengine_norm_reader", layer)
    return True


# MLPs computed as down_proj(silu(gate_proj(x)) * up_proj(x)).
FOLDABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")


def _gated_mlp_forward(self, x):
    """Forward of an MLP whose SiLU gate is folded into down_proj's quantization: down_proj reads [gate | up]."""
    return self.down_proj(self.gate_proj._fused._compute(x))


def fold_gate_into_down_proj(mlp: nn.Module, gate_up: EngineLinear) -> bool:
    """Let the MLP's down_proj compute silu(gate) * up inside its activation quantization, reading the fused
    gate/up layer's whole output [gate | up]: the product is never written out in fp32 (one pass instead of three).
    CPU backends, SiLU, the MLP classes of FOLDABLE_MLPS only; returns whether it folded; unfold_gates undoes it."""
    down = getattr(mlp, "down_proj", None)
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    act = type(getattr(mlp, "act_fn", None)).__name__
    if (type(mlp).__name__ not in FOLDABLE_MLPS or act not in ("SiLU", "SiLUActivation")
            or not isinstance(down, EngineLinear) or down._fused is not None or down.packed is None
            or down.packed.backend == "cuda" or gate_up.packed is None or gate_up.packed.backend == "cuda"
            or not isinstance(gate, EngineLinear) or not isinstance(up, EngineLinear)
            or gate._fused is not gate_up or up._fused is not gate_up
            or gate._fused_columns != (0, down.in_features)
            or up._fused_columns != (down.in_features, 2 * down.in_features)):
        return False
    down.pre_gate = True
    _install(mlp, _gated_mlp_forward, "_osengine_gate_reader", down)
    return True


def unfold_gates(model: nn.Module) -> int:
    """Undo fold_gate_into_down_proj everywhere in `model`."""
    return _unfold(model, "_osengine_gate_reader", lambda down: setattr(down, "pre_gate", False))


def unfold_norms(model: nn.Module) -> int:
    """Undo fold_norm_into_quantizer everywhere in `model` (norms compute again, their readers stop normalizing)."""
    return _unfold(model, "_osengine_norm_reader", lambda layer: setattr(layer, "pre_norm", None))


class _EngineSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return engine_arithmetic.engine_silu(x).to(x.dtype)


def _engine_norm_forward(self, hidden_states):
    return engine_arithmetic.engine_rms_norm(hidden_states, self.weight, self.variance_epsilon).to(hidden_states.dtype)


def simulate_folded_prologues(simulation: nn.Module, engine_model: nn.Module) -> int:
    """Give a fake-quant model the prologues that `engine_model` (the same model after convert_to_engine) folds into
    its quantize kernels, in the kernels' arithmetic (osengine.engine_arithmetic): each folded RMSNorm computes
    engine_rms_norm, each MLP whose SiLU gate is folded uses engine_silu. With quantizers.set_integer_exact on its
    linears, `simulation` then computes the engine model's floats exactly. Returns the number of modules changed."""
    count = 0
    for name, module in engine_model.named_modules():
        if "_osengine_norm_reader" in module.__dict__:
            norm = simulation.get_submodule(name)
            norm.forward = types.MethodType(_engine_norm_forward, norm)
            count += 1
        if "_osengine_gate_reader" in module.__dict__:
            simulation.get_submodule(name).act_fn = _EngineSiLU()
            count += 1
    return count


def _install(module: nn.Module, forward, tag: str, reader: EngineLinear) -> None:
    """Give `module` its folded forward (an instance attribute: it shadows the class's forward) and remember the
    EngineLinear that now does its work (a plain attribute, outside the module tree) under `tag`."""
    reader._fast = None
    module.forward = types.MethodType(forward, module)
    object.__setattr__(module, tag, reader)


def _unfold(model: nn.Module, tag: str, reset) -> int:
    """Remove the folded forward of every module tagged `tag` and reset its reader; returns how many."""
    count = 0
    for m in model.modules():
        reader = m.__dict__.pop(tag, None)
        if reader is not None:
            m.__dict__.pop("forward", None)
            reset(reader)
            reader._fast = None
            count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------

class EngineEmbedding(nn.Module):
    """A token embedding table in int8 with one scale per row (symmetric: row = scale * codes); a lookup
    dequantizes only the rows it gathers. The codes live in the module (`codes`, `row_scale`), or, for an lm_head
    tied to the embedding, in that lm_head's packed engine weights (read with PackedWeights.unpack_rows): one int8
    copy serves both."""

    def __init__(self, codes: Optional[torch.Tensor], row_scale: Optional[torch.Tensor],
                 source: Optional[EngineLinear] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("row_scale", row_scale)
        object.__setattr__(self, "source", source)  # not a submodule: the lm_head is registered where it lives
        self.out_dtype = dtype
        self.num_embeddings = source.out_features if source is not None else codes.shape[0]
        self.embedding_dim = source.in_features if source is not None else codes.shape[1]

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "EngineEmbedding":
        from .engine_linear import quantize_weight_symmetric

        codes, scale = quantize_weight_symmetric(weight.detach().float(), 8)
        return cls(codes.to(weight.device), scale.to(weight.device), dtype=weight.dtype)

    @classmethod
    def sharing(cls, lm_head: EngineLinear, dtype: torch.dtype = torch.float32) -> "EngineEmbedding":
        """The embedding of a tied model whose lm_head runs on the engine (8-bit, per-channel, CPU backends)."""
        if lm_head.weight_bits != 8 or lm_head.weight_group_size or lm_head.packed is None or \
                lm_head.packed.backend == "cuda" or lm_head.w_scale.numel() != lm_head.out_features:
            raise ValueError("EngineEmbedding.sharing: needs an lm_head with int8 per-channel weights packed for "
                             "the CPU")
        return cls(None, None, source=lm_head, dtype=dtype)

    @property
    def weight_nbytes(self) -> int:
        return 0 if self.source is not None else self.codes.numel() + self.row_scale.numel() * 4

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        if self.source is not None:
            rows = flat.to(torch.int32)
            codes = np.empty((rows.numel(), self.embedding_dim), dtype=np.int8)
            self.source.packed.unpack_rows(rows.numpy(), codes)
            codes = torch.from_numpy(codes)
            scale = self.source.w_scale[flat]
        else:
            codes = self.codes[flat]
            scale = self.row_scale[flat]
        out = codes.float() * scale.unsqueeze(-1)
        return out.view(*input_ids.shape, self.embedding_dim).to(self.out_dtype)

    def extra_repr(self) -> str:
        where = "in the tied lm_head's packed weights" if self.source is not None else "int8 table"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales, {where}"


def quantize_embeddings(model: nn.Module, backend: str = "auto") -> nn.Module:
    """lm_head on the engine (int8 per-channel weights, activations int8 asymmetric per token, dynamic) and the input
    embedding table in int8 (per-row scales); a tied pair keeps one int8 copy. In place; returns the model."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    tied = (isinstance(emb, nn.Embedding) and type(head) is nn.Linear and
            emb.weight.data_ptr() == head.weight.data_ptr() and emb.weight.shape == head.weight.shape)
    new_head = None
    if type(head) is nn.Linear:
        new_head = EngineLinear.from_float(head, weight_bits=8, act_bits=8, act_symmetric=False, act_dynamic=True,
                                           backend=backend)
        new_head.to(head.weight.device)
        model.set_output_embeddings(new_head)
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False  # nothing left to tie: keep transformers from re-tying
    if isinstance(emb, nn.Embedding):
        if tied and new_head is not None and new_head.packed.backend != "cuda":
            new_emb = EngineEmbedding.sharing(new_head, dtype=emb.weight.dtype)
        else:
            new_emb = EngineEmbedding.from_float(emb.weight)
        model.set_input_embeddings(new_emb)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Memory and benchmark switches
# ----------------------------------------------------------------------------------------------------------------

def _engine_layers(model: nn.Module):
    seen = set()
    for m in model.modules():
        if isinstance(m, EngineLinear):
            for layer in (m, m._fused):
                if layer is not None and id(layer) not in seen:
                    seen.add(id(layer))
                    yield layer


def model_memory(model: nn.Module) -> dict:
    """Bytes the model holds for inference: parameters and buffers (each storage once: tied tensors are shared),
    the engine's packed weights with their zero-point column sums, and the fused layers' own scales and biases.
    {"tensors": bytes, "packed": bytes, "total": bytes}."""
    seen, tensors = set(), 0
    in_tree = {id(m) for m in model.modules()}
    extra_buffers = [b for layer in _engine_layers(model) if id(layer) not in in_tree for b in layer.buffers()]
    for t in list(model.parameters()) + list(model.buffers()) + extra_buffers:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        tensors += t.untyped_storage().nbytes()
    packed = 0
    for layer in _engine_layers(model):
        if layer.packed is not None:
            packed += int(layer.packed.nbytes) + 4 * layer.packed.n * layer.packed.num_groups
    return {"tensors": tensors, "packed": packed, "total": tensors + packed}


def set_shift_mode(model: nn.Module, mode: str) -> int:
    """"fused" (default: the runtime OS+ shift is subtracted inside the quantize kernel) or "separate" (an elementwise
    x - z pass first; for measuring what the fusion saves). Returns how many shifted layers were switched."""
    if mode not in ("fused", "separate"):
        raise ValueError(f"set_shift_mode: mode must be 'fused' or 'separate', got {mode!r}")
    count = 0
    for layer in _engine_layers(model):
        layer.separate_shift = mode == "separate"
        layer._fast = None
        count += layer.input_shift is not None and layer.packed is not None
    return count

"""The token embedding table in int8 (one scale per row) and lm_head on the engine; a tied pair keeps one int8 copy."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..quant.spec import symmetric_weight_codes
from .linear import EngineLinear


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
        codes, scale, _ = symmetric_weight_codes(weight.detach().float(), 8)
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

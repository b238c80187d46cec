"""Models larger than memory: calibration that holds one transformer block at a time.

`osengine quantize MODEL --max-memory 1.5GiB --out DIR` (`quantize(..., max_memory=...)`) builds the model with
empty weights (accelerate's init_empty_weights), reads the tensors outside the blocks that the calibration inputs need
(the embeddings) from the folder's safetensors files, captures the first block's inputs and lets those go again. Then
block by block: the block's weights are read from the safetensors files, the block is calibrated as always, its
quantized tensors (integer codes, scales, ranges) are written to a shard on disk and the block goes back to empty
(meta) tensors. The output folder is assembled at the end by streaming: the shards' tensors and, for the tensors
outside the blocks (embeddings, final norm, lm_head: never changed by calibration), the source's, one tensor at a
time into one model.safetensors, the same file an in-memory run writes (checked: tests/io/test_streaming.py).

Peak memory is one block's weights + the calibration activations of one block + the interpreter, not the model;
`max_memory` is checked against an estimate of that before anything is loaded, and the run fails early with the
estimate when it does not fit. Not with streaming (refused with a message): post-LN encoders (their migrations fold
into the previous block and the embeddings' norm), quantized BMM inputs, a full-precision prefix (computed by the
whole model), resumable progress and several processes.
"""
from __future__ import annotations

import ctypes
import gc
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from .quantized_model import layer_manifest, owning_block, weight_codes_tensors
from .sources import ModelLoadError, is_causal, resolve_source

# safetensors' dtype names
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.bool: "BOOL"}
INTERPRETER_BYTES = 450 * 2 ** 20     # python + torch + transformers loaded, measured on this project's CPU machine


class StreamingError(ValueError):
    """A model or setting that block-by-block streaming cannot handle, or a memory limit it cannot keep."""


def parse_memory(value: Union[str, int]) -> int:
    """Bytes from 1610612736, "1.5GiB", "1500MB", "2G" (K/M/G/T: powers of 1024 with or without "iB"; "KB", "MB",
    "GB", "TB": powers of 1000)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(value), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise StreamingError(f"max_memory must be a size such as 1.5GiB, 1500MB or a number of bytes, got {value!r}")
    number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1000 if suffix.upper() == "B" and unit else 1024
    return int(number * base ** "_KMGT".index(unit or "_"))


class SafetensorsFolder:
    """The tensors of a folder's *.safetensors files, read one at a time (safetensors' safe_open)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        self.shapes = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    self.files[name] = path
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
        if not self.files:
            raise ModelLoadError(f"model folder {folder} has no .safetensors weights (pickled weights are not loaded)")

    def tensor(self, name: str) -> torch.Tensor:
        return read_tensor(self.files[name], name)

    def row_chunks(self, name: str, dtype: torch.dtype, chunk_bytes: int = 32 * 2 ** 20):
        """The tensor in pieces of whole rows (about chunk_bytes each) converted to `dtype`: what a writer streams
        without holding a whole embedding table."""
        from safetensors import safe_open

        shape = self.shapes[name]
        with safe_open(str(self.files[name]), "pt") as f:
            if len(shape) < 2:
                yield f.get_tensor(name).to(dtype)
                return
            row = max(1, int(torch.Size(shape[1:]).numel()) * 4)
            step = max(1, chunk_bytes // row)
            part = f.get_slice(name)
            for start in range(0, shape[0], step):
                yield part[start:start + step].to(dtype)


def return_freed_memory() -> None:
    """Give the memory of released tensors back to the system: glibc keeps freed heap pages of a multi-threaded
    process in its arenas (measured: resident memory grew by ~100 MiB a block without this), malloc_trim returns
    them. A no-op where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StreamedModel:
    """A model whose blocks live on disk until calibrated (for calibrate_blockwise(..., residency=...)): `load_block`
    reads a block's weights, `release_block` writes its quantized tensors to a shard and empties it."""

    def __init__(self, model: nn.Module, weights: SafetensorsFolder, block_names: list, dtype: torch.dtype):
        self.model, self.weights, self.block_names, self.dtype = model, weights, block_names, dtype
        self.work = Path(tempfile.mkdtemp(prefix="osengine-streaming-"))
        self.layers: dict = {}
        self.shards: list = []       # (path, {name: (dtype, shape)}) per released block
        prefix = getattr(model, "base_model_prefix", "")
        self._names = {}             # model state name -> name in the source files
        for name in model.state_dict():
            for candidate in (name, name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}"):
                if candidate in weights.files:
                    self._names[name] = candidate
                    break

    def _load(self, names) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            source = self._names.get(name)
            if source is None:
                raise StreamingError(f"the model's tensor {name!r} is not in the source's safetensors files")
            value = self.weights.tensor(source)
            set_module_tensor_to_device(self.model, name, "cpu", value=value.to(self.dtype)
                                        if value.is_floating_point() else value)

    def _state_names(self, index: Optional[int]) -> list:
        return [n for n in self.model.state_dict() if owning_block(n, self.block_names) == index]

    def load_outside(self) -> None:
        """The tensors outside the blocks that capturing the first block's inputs needs (embeddings, their norms:
        all but the output head, which is only written at the end)."""
        outside = [n for n in self._state_names(None) if n not in self.output_head_names()]
        tied = [n for n in outside if n not in self._names]
        self._load([n for n in outside if n in self._names])
        if tied:
            self.model.tie_weights()
            missing = [n for n in tied if self.model.state_dict()[n].is_meta]
            if missing:
                raise StreamingError(f"the model's tensors {missing} are not in the source's safetensors files")
        self._outside = self._outside_tensors()   # while the tied parameters are still one object

    def output_head_names(self) -> set:
        """The state names of an untied output head (lm_head), which calibration never reads."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is None or head.weight is self.model.get_input_embeddings().weight:
            return set()
        for module_name, module in self.model.named_modules():
            if module is head:
                return {f"{module_name}.{leaf}" for leaf, _ in head.named_parameters()}
        return set()

    def release_outside(self) -> None:
        """Empty the modules outside the blocks once the first block's inputs are captured: calibration does not
        change them (pre-LN decoders), and they are written from the source at the end."""
        for name, module in self.model.named_modules():
            inside = owning_block(name, self.block_names) is not None or name in self.block_names
            holds_a_block = any(b.startswith(name + ".") for b in self.block_names) or name == ""
            if not inside and not holds_a_block:
                module.to("meta")
        return_freed_memory()

    def load_block(self, model: nn.Module, index: int, name: str) -> None:
        self._load(self._state_names(index))

    def release_block(self, model: nn.Module, index: int, name: str) -> None:
        from safetensors.torch import save_file

        block = model.get_submodule(name)
        layers = layer_manifest(block, prefix=name)
        tensors = {f"{name}.{k}": v for k, v in block.state_dict().items()}
        weight_codes_tensors(tensors, layers)
        path = self.work / f"block-{index:05d}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
        self.layers.update(layers)
        self.shards.append((path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}))
        block.to("meta")
        del tensors
        return_freed_memory()

    def outside_tensors(self) -> tuple:
        """({model name: source name} of the tensors outside the blocks, written once; {alias: stored name} of the
        tied ones), as save_quantized deduplicates them."""
        return self._outside

    def _outside_tensors(self) -> tuple:
        stored, tied, seen = {}, {}, {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if owning_block(name, self.block_names) is not None:
                continue
            if id(param) in seen:
                tied[name] = seen[id(param)]
                continue
            seen[id(param)] = name
            stored[name] = self._names[name]
        for name, _ in self.model.named_buffers():   # persistent ones are in the source
            if owning_block(name, self.block_names) is None and name in self._names:
                stored[name] = self._names[name]
        return stored, tied

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def estimated_peak_bytes(config, block_bytes: int, outside_bytes: int, n_samples: int, seq_len: int,
                         batch_size: int) -> int:
    """An upper estimate of a streamed calibration's peak memory: the interpreter, the embeddings while the first
    inputs are captured or one block's weights twice (fp32 and their quantized copies), the calibration
    activations of one block (its inputs and outputs, every site's inputs, one batch's intermediate results)."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    tokens, element = n_samples * seq_len, 4
    activations = tokens * element * (2 * hidden + 3 * hidden + intermediate)
    per_batch = batch_size * seq_len * element * (4 * hidden + 3 * intermediate)
    return INTERPRETER_BYTES + max(outside_bytes, 2 * block_bytes) + activations + per_batch


def load_streamed(source, max_memory: int, n_samples: int, seq_len: int, batch_size: int):
    """(model with empty weights, tokenizer, StreamedModel): a Hugging Face folder to calibrate block by block within
    `max_memory` bytes; StreamingError (before any weight is read) when the estimate does not fit."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..plugins.registry import resolve_architecture

    path = resolve_source(source)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise StreamingError(f"max_memory streams a Hugging Face folder's safetensors files; {str(path)!r} is not "
                             "one (convert a GGUF file with osengine's loader first)")
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if is_causal(config) else AutoModel
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=torch.float32)
    model.tie_weights()   # a tied lm_head is the embeddings' parameter from now on (as from_pretrained leaves it)
    model.eval()
    arch = resolve_architecture(model)
    block_names = arch.blocks(model)
    if any(site.block_input for i in range(len(block_names)) for site in arch.sites(model, i)):
        raise StreamingError(f"architecture {arch.name} folds migrations into the previous block's output norm "
                             "(post-LN); max_memory streams pre-LN decoders only")
    weights = SafetensorsFolder(path)
    streamed = StreamedModel(model, weights, block_names, torch.float32)
    sizes, head = {}, streamed.output_head_names()
    for name, t in model.state_dict().items():
        if name not in head:
            sizes.setdefault(owning_block(name, block_names), 0)
            sizes[owning_block(name, block_names)] += t.numel() * 4
    block_bytes = max(v for k, v in sizes.items() if k is not None)
    need = estimated_peak_bytes(config, block_bytes, sizes.get(None, 0), n_samples, seq_len, batch_size)
    if need > max_memory:
        streamed.cleanup()
        raise StreamingError(f"calibrating {path.name} block by block needs about {need / 2 ** 30:.2f} GiB "
                             f"(largest block {block_bytes / 2 ** 20:.0f} MiB in fp32, embeddings "
                             f"{sizes.get(None, 0) / 2 ** 20:.0f} MiB, activations of "
                             f"{n_samples} x {seq_len} calibration tokens), more than max_memory "
                             f"{max_memory / 2 ** 30:.2f} GiB: raise max_memory or reduce the samples / seq_len")
    streamed.load_outside()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, streamed


def write_safetensors(path: Path, entries: list) -> dict:
    """Write one safetensors file from `entries` [(name, dtype, shape, read)] where read() returns the tensor, or an
    iterator of row chunks of it, one tensor (or chunk) in memory at a time (safetensors' own writer takes them all
    at once). The layout is the format's: an
    8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes) giving each tensor's dtype,
    shape and byte offsets, then the tensors' bytes in that order. Returns the manifest's tensor table."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        size = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset,
                                                                                                 offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dtype, shape, read in entries:
            value = read()
            pieces = [value] if isinstance(value, torch.Tensor) else value
            rows, trailing = 0, None
            for t in pieces:
                t = t.detach().to("cpu").contiguous()
                whole = isinstance(value, torch.Tensor)
                if t.dtype != dtype or (whole and tuple(t.shape) != tuple(shape)):
                    raise StreamingError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)} where {dtype} "
                                         f"{tuple(shape)} was announced")
                rows, trailing = rows + (t.shape[0] if t.dim() else 1), tuple(t.shape[1:])
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # no copy of the bytes
            if not isinstance(value, torch.Tensor) and len(shape) and (rows, trailing) != (shape[0], tuple(shape[1:])):
                raise StreamingError(f"tensor {name!r}: its pieces add up to {rows} rows of {trailing} where "
                                     f"{tuple(shape)} was announced")
    return {name: {"dtype": str(dtype).replace("torch.", ""), "shape": list(shape)}
            for name, dtype, shape, _ in entries}


def save_streamed(streamed: StreamedModel, tokenizer, out_dir, manifest: dict, extra_tensors: dict,
                  overwrite: bool = False) -> Path:
    """The quantized folder of a streamed calibration, identical to what save_quantized writes for the same model."""
    from .checkpoint import save_checkpoint_with
    from .quantized_model import model_side_files

    outside, tied = streamed.outside_tensors()
    entries = []
    for name, source in outside.items():
        dtype = streamed.dtype
        entries.append((name, dtype, streamed.weights.shapes[source],
                        lambda s=source, d=dtype: streamed.weights.row_chunks(s, d)))
    for path, table in streamed.shards:
        for name, (dtype, shape) in table.items():
            entries.append((name, dtype, shape, lambda p=path, n=name: read_tensor(p, n)))
    for name, t in extra_tensors.items():
        entries.append((name, t.dtype, tuple(t.shape), lambda t=t: t))
    full = {"kind": "fake-quant", **manifest, "tied": tied, "layers": streamed.layers}
    with model_side_files(streamed.model, tokenizer) as side:
        return save_checkpoint_with(out_dir, lambda path: write_safetensors(path, entries), full, side, overwrite)


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, the others left on disk."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)

"""Resumable calibration: the progress of a block-by-block calibration, saved after every block beside the output,
so that a run killed at any point continues from the last finished block (`osengine quantize ... --out DIR --resume`)
and writes the same folder as an uninterrupted run.

    OUT.progress/identity.json              what the run is: the model's content digest, recipe, strategy and its
                                            options, calibration arguments, blocks; a resume must match it
    OUT.progress/calibration.safetensors    the calibration token ids (a resume does not regenerate or re-read them)
    OUT.progress/blocks/block-NNNNN.safetensors
                                            after block N: every tensor of block N, and those of its migration
                                            sites' producers outside it that changed while it was calibrated (a
                                            post-LN model folds a shift into the previous block's output norm)
    OUT.progress/step-NNNNN/                the state after N finished blocks: state.json (the structure calibration
                                            added: residual restores, added biases, runtime shifts; the report so
                                            far) and tensors.safetensors (the next block's inputs, the report's
                                            tensors)

Each file is complete before the step folder that needs it is renamed into place (every write goes to a temporary
name first), and a step folder is complete when it has its name, so a kill at any moment leaves the last finished
block resumable. The folder is removed once the output is saved. Only safetensors and JSON are read (no pickle).
What a block's steps change is that block and the producers of its migration sites (a migration folds into its
site's producer and consumers; nothing else is written), so only those are compared before and after each block.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..quant.layers import quantize_block, wrap_linears
from .checkpoint import write_folder_atomically
from .quantized_model import owning_block, restore_structure, structure_manifest

IDENTITY_FILE = "identity.json"
CALIBRATION_FILE = "calibration.safetensors"
STATE_FILE = "state.json"
STEP_TENSORS_FILE = "tensors.safetensors"
STEP_PATTERN = re.compile(r"^step-(\d{5})$")


class ProgressError(ValueError):
    """The progress folder cannot be used (another run's, damaged) or a value cannot be recorded in it."""


def progress_folder(out) -> Path:
    """Where the progress of a run writing `out` is kept: a sibling OUT.progress."""
    out = Path(out)
    return out.with_name(out.name + ".progress")


def remove_stale_staging(out) -> list:
    """Remove the temporary folders that a killed run left beside `out` (the output's and its progress folder's
    staging copies: hidden names written by write_folder_atomically); returns their paths."""
    out = Path(out)
    removed = []
    for name in (out.name, progress_folder(out).name):
        for stale in out.parent.glob(f".{name}.*-*") if out.parent.is_dir() else []:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def state_digest(model: nn.Module) -> str:
    """One digest of every tensor of the model's state (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(bytes.fromhex(tensor_digest(t)))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Nested values (block input calls, report records) as JSON + named tensors


def encode_tree(value: Any, tensors: dict, where: str) -> Any:
    """`value` (tensors, None, bool, int, float, str, tuples, lists, str-keyed dicts) as JSON, its tensors moved
    into `tensors` under fresh names."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").clone()
        return {"tensor": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:   # numpy scalars
        return {"value": value.item()}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: encode_tree(v, tensors, f"{where}.{k}") for k, v in value.items()}}
    raise ProgressError(f"cannot record {where} (a {type(value).__name__}) in the calibration progress; run without "
                        "an output folder, or report this architecture")


def decode_tree(node: Any, tensors: dict, device) -> Any:
    kind, body = next(iter(node.items()))
    if kind == "tensor":
        return tensors[body].to(device)
    if kind == "value":
        return body
    if kind in ("tuple", "list"):
        items = [decode_tree(v, tensors, device) for v in body]
        return tuple(items) if kind == "tuple" else items
    return {k: decode_tree(v, tensors, device) for k, v in body.items()}


# ---------------------------------------------------------------------------------------------------------------


class CalibrationProgress:
    """The progress of one calibration run, for `calibrate_blockwise(..., checkpoints=...)`: `save` after each
    block, `restore` at the start of a resumed run."""

    def __init__(self, folder, identity: dict, recipe, arch):
        self.folder = Path(folder)
        self.identity = identity
        self.recipe = recipe
        self.arch = arch
        self._digests: dict = {}    # watched tensor name -> digest before the current block's steps

    # -- starting --------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.folder / IDENTITY_FILE).is_file()

    def start(self, token_ids) -> None:
        """A new run: an empty progress folder with the run's identity and calibration ids."""
        from safetensors.torch import save_file

        if self.folder.exists():
            shutil.rmtree(self.folder)
        tensors = {}
        tree = encode_tree(token_ids, tensors, "the calibration ids")

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / CALIBRATION_FILE))
            (staging / IDENTITY_FILE).write_text(json.dumps({**self.identity, "calibration_ids": tree}, indent=1))

        write_folder_atomically(self.folder, write, "starting")

    def check_identity(self) -> None:
        saved = self._read_json(self.folder / IDENTITY_FILE)
        for key, value in self.identity.items():
            if saved.get(key) != value:
                raise ProgressError(f"the calibration progress at {str(self.folder)!r} belongs to another run: its "
                                    f"{key} is {saved.get(key)!r}, this run's {value!r}. Delete the folder to start "
                                    "over, or resume with the same arguments")

    def calibration_ids(self):
        from safetensors.torch import load_file

        saved = self._read_json(self.folder / IDENTITY_FILE)
        try:
            return decode_tree(saved["calibration_ids"], load_file(str(self.folder / CALIBRATION_FILE)), "cpu")
        except Exception as e:   # a damaged file: say which
            raise ProgressError(f"the calibration progress at {str(self.folder)!r} is damaged "
                                f"({CALIBRATION_FILE}: {e}); delete the folder to start over") from None

    # -- during the run --------------------------------------------------------------------------------------

    def save(self, index: int, model: nn.Module, block_names: list, calls: list, report: dict) -> None:
        """Block `index` is finished and `calls` are the next block's inputs."""
        from safetensors.torch import save_file

        state = model.state_dict()
        tensors = {name: t for name, t in state.items() if owning_block(name, block_names) == index}
        for name in self._watched(model, block_names, index):   # what its migrations changed or added outside it
            if self._digests.get(name) != tensor_digest(state[name]):
                tensors[name] = state[name]
        if index + 1 < len(block_names):
            self.baseline(model, block_names, index + 1)
        blocks = self.folder / "blocks"
        blocks.mkdir(exist_ok=True)
        staging = blocks / f".block-{index:05d}.writing"
        save_file({k: v.detach().to("cpu").clone() for k, v in tensors.items()}, str(staging))
        _flush(staging)
        os.replace(staging, blocks / f"block-{index:05d}.safetensors")

        step_tensors = {}
        step = {"finished_blocks": index + 1, "structure": structure_manifest(model),
                "calls": encode_tree(calls, step_tensors, "the next block's inputs"),
                "report": encode_tree(report, step_tensors, "the report")}

        def write(staging: Path) -> None:
            save_file(step_tensors, str(staging / STEP_TENSORS_FILE))
            (staging / STATE_FILE).write_text(json.dumps(step))

        write_folder_atomically(self.folder / f"step-{index + 1:05d}", write, "writing")
        for older in self._steps()[:-1]:
            shutil.rmtree(older, ignore_errors=True)

    def baseline(self, model: nn.Module, block_names: list, index: int) -> None:
        """Before block `index`: the digests of the tensors outside it that its steps may change, those of its
        migration sites' producers (a post-LN model's previous output norm, say); all else outside the block stays
        as it is."""
        state = model.state_dict()
        self._digests = {name: tensor_digest(state[name]) for name in self._watched(model, block_names, index)}

    def _watched(self, model: nn.Module, block_names: list, index: int) -> list:
        """The state entries outside block `index` under its migration sites' producers."""
        owners = [site.producer for site in self.arch.sites(model, index)]
        return [name for name in model.state_dict()
                if owning_block(name, block_names) != index and any(name.startswith(o + ".") for o in owners)]

    # -- resuming --------------------------------------------------------------------------------------------

    def restore(self, model: nn.Module, block_names: list) -> Optional[tuple]:
        """(finished blocks, the next block's input calls, the report so far), with the finished blocks' structure
        and tensors put back into `model`; None when no block has finished."""
        from safetensors.torch import load_file

        steps = self._steps()
        if not steps:
            self.baseline(model, block_names, 0)
            return None
        step = steps[-1]
        state = self._read_json(step / STATE_FILE)
        finished = state.get("finished_blocks")
        if not isinstance(finished, int) or not 0 < finished <= len(block_names):
            raise ProgressError(f"{step / STATE_FILE}: finished_blocks must be in 1..{len(block_names)}, "
                                f"got {finished!r}")
        device = next(model.parameters()).device
        for name in block_names[:finished]:
            block = model.get_submodule(name)
            wrap_linears(block)
            quantize_block(block, name, self.recipe)
        restore_structure(model, state["structure"])
        expected = model.state_dict()
        for index in range(finished):
            path = self.folder / "blocks" / f"block-{index:05d}.safetensors"
            try:
                tensors = load_file(str(path))
            except Exception as e:
                raise ProgressError(f"the calibration progress at {str(self.folder)!r} is damaged ({path.name}: "
                                    f"{e}); delete the folder to start over") from None
            unknown = [k for k in tensors if k not in expected or tuple(expected[k].shape) != tuple(tensors[k].shape)]
            if unknown:
                raise ProgressError(f"{path}: tensor {unknown[0]!r} does not fit the model being calibrated")
            model.load_state_dict(tensors, strict=False)
        try:
            saved = load_file(str(step / STEP_TENSORS_FILE))
            calls = decode_tree(state["calls"], saved, device)
            report = decode_tree(state["report"], saved, "cpu")
        except Exception as e:
            raise ProgressError(f"the calibration progress at {str(self.folder)!r} is damaged ({step.name}: {e}); "
                                "delete the folder to start over") from None
        if finished < len(block_names):
            self.baseline(model, block_names, finished)
        return finished, calls, report

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------------------

    def _steps(self) -> list:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if STEP_PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ProgressError(f"{path} cannot be read ({e}); delete {path.parent} to start over") from None
        if not isinstance(value, dict):
            raise ProgressError(f"{path} must hold a JSON object; delete {path.parent} to start over")
        return value


def _flush(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


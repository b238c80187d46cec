"""The osengine checkpoint: a folder with safetensors tensors and a JSON manifest.

    DIR/osengine.json         {"format": "osengine-checkpoint", "format_version": 4, ...,
                               "tensors": {name: {dtype, shape}}, "tensors_sha256": hex digest,
                               "manifest_sha256": hex digest of the rest of the manifest}
    DIR/model.safetensors     every tensor the manifest lists
    DIR/<other files>         source model config, tokenizer files, ...

Saving is atomic: everything is written into a temporary sibling folder, flushed, and renamed into place, so an
interrupted save leaves either the previous checkpoint or the new one, never a half-written folder. Loading validates
the manifest and every tensor before anything is used, and reports a clear CheckpointError otherwise. Tensors are read
with safetensors only (never pickle). The SHA-256 of model.safetensors and of the manifest's content, recorded at
saving, are checked on loading, so flipped bytes in the tensor data or in a number of the manifest (which no format
check can see) are an error, not a silently different model; folders saved before the digests existed load without
that check. A tool that edits a manifest on purpose writes it with `write_manifest`, which records the new digest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

FORMAT_NAME = "osengine-checkpoint"
# 1: every weight in floating point (fake-quantized values). 2: the quantized linears' weights as integer codes and
# scales (layers[L].weight_storage == "codes": L.weight_codes, L.weight_scale). 3: may carry "prefix", token ids
# that every sequence runs behind in full precision (calibrate/prefix.py); readers of 2 would ignore it. 4: a prefix
# comes with its keys and values per layer (osengine.prefix.{layer}.key / .value); a version-3 folder with a prefix
# has none and must be quantized again (folders without a prefix, of every version, load).
FORMAT_VERSION = 4
MANIFEST_FILE = "osengine.json"
TENSORS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (missing, truncated, corrupt, too new, inconsistent)."""


def save_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, Any], manifest: Mapping[str, Any],
                    extra_files: Optional[Mapping[str, str | os.PathLike]] = None, overwrite: bool = False) -> Path:
    """Write `tensors` (name -> torch tensor) and `manifest` (JSON-serialisable) into `directory`, atomically.

    extra_files: name in the checkpoint -> path of a file to copy in (config, tokenizer). An existing checkpoint at
    `directory` is replaced only with overwrite=True, and only once the new one is complete.
    """
    from safetensors.torch import save_file

    def write_tensors(path: Path) -> dict:
        contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(contiguous, str(path))
        return {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                for name, t in contiguous.items()}

    return save_checkpoint_with(directory, write_tensors, manifest, extra_files, overwrite)


def save_checkpoint_with(directory: str | os.PathLike, write_tensors, manifest: Mapping[str, Any],
                         extra_files: Optional[Mapping[str, str | os.PathLike]] = None,
                         overwrite: bool = False) -> Path:
    """save_checkpoint with the tensors file written by `write_tensors(path)`, which returns the manifest's tensor
    table {name: {"dtype", "shape"}} (a writer that streams tensors from disk: io/streaming.py)."""
    target = Path(directory)
    refuse_existing_output(target, overwrite)

    def write(staging: Path) -> None:
        table = write_tensors(staging / TENSORS_FILE)
        full_manifest = dict(manifest)
        full_manifest["tensors_sha256"] = file_sha256(staging / TENSORS_FILE)
        full_manifest["format"] = FORMAT_NAME
        full_manifest["format_version"] = FORMAT_VERSION
        full_manifest["tensors"] = table
        write_manifest(staging, full_manifest)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)

    write_folder_atomically(target, write, "saving")
    return target


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """The digest of a manifest's content (its own digest field left out), independent of the file's layout."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write `manifest` as DIR/osengine.json with the digest of its content."""
    path = Path(directory) / MANIFEST_FILE
    sealed = {**manifest, "manifest_sha256": manifest_sha256(manifest)}
    with open(path, "w") as f:
        json.dump(sealed, f, indent=2, sort_keys=True)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_existing_output(path: str | os.PathLike, overwrite: bool, error: type = FileExistsError) -> None:
    """Raise `error` when the output folder `path` exists and may not be replaced: checked before any work starts
    (quantize, export), and again just before writing."""
    if Path(path).exists() and not overwrite:
        raise error(f"output folder {str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")


def write_folder_atomically(target: Path, write, label: str = "writing") -> Path:
    """Run write(staging) into a temporary sibling of `target`, flush every file, then rename it into place. An
    existing `target` is moved aside first and removed last, so a crash leaves one complete folder on disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{label}-", dir=target.parent))
    try:
        write(staging)
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, retired / target.name)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike) -> Dict[str, Any]:
    """The validated manifest of a checkpoint folder."""
    folder = Path(directory)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: no such folder")
    if not path.is_file():
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {MANIFEST_FILE} is missing; this is not an "
                              f"osengine checkpoint (or its save was interrupted)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {MANIFEST_FILE} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {MANIFEST_FILE} does not describe an osengine "
                              f"checkpoint (format = {found!r})")
    recorded = manifest.get("manifest_sha256")
    if recorded is not None and recorded != manifest_sha256(manifest):
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {MANIFEST_FILE} is corrupt (its content does not "
                              "match the SHA-256 recorded when it was saved; a deliberate edit must be written with "
                              "osengine.io.checkpoint.write_manifest)")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: format version {version} is newer than this "
                              f"osengine supports ({FORMAT_VERSION}); upgrade osengine")
    if not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: the manifest has no 'tensors' table")
    return manifest


def load_checkpoint(directory: str | os.PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(tensors, manifest) of a checkpoint folder, with every tensor checked against the manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    manifest = read_manifest(folder)
    path = folder / TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {TENSORS_FILE} is missing")
    recorded = manifest.get("tensors_sha256")
    if recorded is not None and recorded != file_sha256(path):
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {TENSORS_FILE} is truncated or corrupt (its "
                              "SHA-256 differs from the one recorded when it was saved)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {TENSORS_FILE} is truncated or corrupt ({e})") \
            from None
    expected = manifest["tensors"]
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {len(missing)} tensor(s) listed in the manifest "
                              f"are missing from {TENSORS_FILE}, e.g. {missing[:3]}")
    for name, meta in expected.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and isinstance(meta.get("shape"), list)):
            raise CheckpointError(f"osengine checkpoint {str(folder)!r}: {MANIFEST_FILE} entry tensors[{name!r}] must "
                                  f"be {{\"dtype\": str, \"shape\": [int, ...]}}, got {meta!r}")
        t = tensors[name]
        if list(t.shape) != list(meta.get("shape", [])) or str(t.dtype).replace("torch.", "") != meta.get("dtype"):
            raise CheckpointError(f"osengine checkpoint {str(folder)!r}: tensor {name!r} is {str(t.dtype)} "
                                  f"{list(t.shape)} but the manifest says {meta.get('dtype')} {meta.get('shape')}")
    return tensors, manifest

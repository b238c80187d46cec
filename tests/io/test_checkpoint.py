"""The checkpoint format: atomic saves, and clear errors for every way a folder can be broken."""
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from osengine.io.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_manifest,
)


def tensors():
    return {"layer.weight_codes": torch.randint(-127, 128, (8, 16), dtype=torch.int8),
            "layer.w_scale": torch.rand(8) + 0.1, "norm.weight": torch.randn(16)}


def test_round_trip(tmp_path):
    original = tensors()
    save_checkpoint(tmp_path / "ckpt", original, {"recipe": "w8a8-static"})
    loaded, manifest = load_checkpoint(tmp_path / "ckpt")
    assert manifest["recipe"] == "w8a8-static" and manifest["format_version"] == FORMAT_VERSION
    for name, t in original.items():
        assert torch.equal(loaded[name], t)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tensors(), {})
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_checkpoint(tmp_path / "ckpt", tensors(), {})
    save_checkpoint(tmp_path / "ckpt", {"x": torch.ones(2)}, {"v": 2}, overwrite=True)
    assert load_checkpoint(tmp_path / "ckpt")[1]["v"] == 2


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tensors(), {"v": 1})

    class Boom(Exception):
        pass

    class Exploding:
        def detach(self):
            raise Boom()

    with pytest.raises(Boom):
        save_checkpoint(tmp_path / "ckpt", {"a": torch.ones(1), "b": Exploding()}, {"v": 2}, overwrite=True)
    assert load_checkpoint(tmp_path / "ckpt")[1]["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging folder left behind


def test_truncated_tensor_file(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", tensors(), {})
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        load_checkpoint(folder)


def test_corrupt_manifest(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", tensors(), {})
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE} is corrupt"):
        load_checkpoint(folder)


def test_newer_format_version(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", tensors(), {})
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    write_manifest(folder, manifest)
    with pytest.raises(CheckpointError, match="is newer than this osengine supports"):
        load_checkpoint(folder)


def test_missing_and_mismatched_tensors(tmp_path):
    folder = save_checkpoint(tmp_path / "ckpt", tensors(), {})
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["tensors"]["extra.weight"] = {"dtype": "float32", "shape": [3]}
    write_manifest(folder, manifest)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) listed in the manifest are missing.*extra.weight"):
        load_checkpoint(folder)
    del manifest["tensors"]["extra.weight"]
    manifest["tensors"]["norm.weight"]["shape"] = [17]
    write_manifest(folder, manifest)
    with pytest.raises(CheckpointError, match=r"tensor 'norm.weight' is torch.float32 \[16\] but the manifest says"):
        load_checkpoint(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE} is missing"):
        load_checkpoint(tmp_path / "empty")

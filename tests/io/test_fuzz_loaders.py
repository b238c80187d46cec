"""Fuzzed loaders and inputs: random corruption and truncation of a quantized folder's osengine.json and
model.safetensors, hand-written manifests with fields of random types, random recipes, and calibration or evaluation
text that is empty, binary, one huge line or not UTF-8. Every case ends in a clear error (a ValueError subclass whose
message names the file or the field) or, where the bytes that changed do not matter, in the same model; never a
crash, a hang or a silently different model, and the folder that was read is left as it was."""
import copy
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osengine import api
from osengine.calibrate.data import CalibrationError
from osengine.evaluation import perplexity
from osengine.io.checkpoint import MANIFEST_FILE, TENSORS_FILE, write_manifest
from osengine.quant.recipes import RecipeError, load_recipe

from tiny_models import tiny_llama_folder

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IDS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = tiny_llama_folder(root)
    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    api.quantize(str(base), recipe="w8a8-static", strategy="minmax", calibration=calib, out=root / "q",
                 progress=False)
    model, _ = api.load_model(root / "q")
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    return root / "q", reference


def _copy(folder, tmp_path, name):
    target = tmp_path / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return target


def _loads_the_same_or_fails_clearly(path, reference, names):
    """Load `path`: a ValueError (CheckpointError, RecipeError, ...) whose message names one of `names`, or a model
    whose logits equal the reference."""
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    try:
        model, _ = api.load_model(path)
    except ValueError as e:
        assert any(n in str(e) for n in names), str(e)
    else:
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, reference)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before   # reading changes nothing


@FUZZ
@given(data=st.data())
def test_corrupt_or_truncated_manifest_bytes(folder, tmp_path, data):
    source, reference = folder
    path = _copy(source, tmp_path, "manifest-bytes")
    raw = bytearray((path / MANIFEST_FILE).read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    (path / MANIFEST_FILE).write_bytes(bytes(raw))
    _loads_the_same_or_fails_clearly(path, reference, [MANIFEST_FILE])


@FUZZ
@given(data=st.data())
def test_corrupt_or_truncated_tensor_file(folder, tmp_path, data):
    source, reference = folder
    path = _copy(source, tmp_path, "tensor-bytes")
    raw = bytearray((path / TENSORS_FILE).read_bytes())
    header = int.from_bytes(raw[:8], "little") + 8
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:   # anywhere: the header, or the data that no format check could catch without the digest
        where = data.draw(st.sampled_from(["header", "data"]))
        lo, hi = (0, header - 1) if where == "header" else (header, len(raw) - 1)
        raw[data.draw(st.integers(lo, hi))] ^= data.draw(st.integers(1, 255))
    (path / TENSORS_FILE).write_bytes(bytes(raw))
    _loads_the_same_or_fails_clearly(path, reference, [TENSORS_FILE])


def _leaves(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))
    yield path


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), st.floats(allow_nan=False),
                        st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@FUZZ
@given(data=st.data())
def test_manifest_fields_of_random_types(folder, tmp_path, data):
    # A manifest that a wrong writer (or a hand edit) produced, with its digest recomputed: the loader's own checks
    # must catch it. Fields whose value does not matter may load; then the model must be the same.
    source, reference = folder
    path = _copy(source, tmp_path, "manifest-fields")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    leaves = [p for p in _leaves(manifest) if p and p[0] not in ("manifest_sha256",)]
    target = data.draw(st.sampled_from(leaves), label="field")
    edited = copy.deepcopy(manifest)
    parent = edited
    for key in target[:-1]:
        parent = parent[key]
    if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
        del parent[target[-1]]
    else:
        parent[target[-1]] = data.draw(JSON_VALUES, label="value")
    write_manifest(path, edited)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    try:
        model, _ = api.load_model(path)
    except ValueError as e:
        assert str(path) in str(e) or MANIFEST_FILE in str(e) or "recipe" in str(e), str(e)
    else:
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=IDS).logits).all()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


RECIPE_FIELDS = st.sampled_from(["name", "weights", "activations", "bmm_inputs", "keep_fp", "prefix",
                                 "activation_overrides", "description", "unknown_field"])
SPEC_FIELDS = st.sampled_from(["bits", "symmetric", "granularity", "group_size", "dynamic", "observer", "quantile",
                               "full_range", "rounding", "scale_dtype", "colour"])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(base=st.sampled_from(["w8a8-static", "w4a4-token", "w6a6", "w8a8-mixed"]),
       top=st.dictionaries(RECIPE_FIELDS, JSON_VALUES, max_size=2),
       spec=st.dictionaries(SPEC_FIELDS, JSON_VALUES, max_size=2), which=st.sampled_from(["weights", "activations"]))
def test_random_recipes_are_valid_or_name_the_field(base, top, spec, which):
    raw = load_recipe(base).to_dict()
    raw.update(top)
    if isinstance(raw.get(which), dict):
        raw[which] = {**raw[which], **spec}
    try:
        recipe = load_recipe(raw)
    except RecipeError as e:
        assert "recipe" in str(e) and "'" in str(e), str(e)   # "recipe field 'weights.bits' must be ..."
    else:
        assert recipe.weights.bits in range(2, 9) and recipe.activations.bits in range(2, 9)


BAD_TEXTS = {
    "empty": b"",
    "whitespace": b"   \n\n\t  ",
    "binary": bytes(range(256)) * 8,
    "latin-1": "caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50,
    "one huge line": b"w1 " * 200_000,
}


@pytest.mark.parametrize("kind", list(BAD_TEXTS))
def test_calibration_and_evaluation_text(folder, tmp_path, kind):
    source, _ = folder
    text = tmp_path / f"{kind.replace(' ', '_')}.txt"
    text.write_bytes(BAD_TEXTS[kind])
    model, tokenizer = api.load_model(source)
    base = tiny_llama_folder(tmp_path)
    if kind == "one huge line":   # valid text: both work
        api.quantize(str(base), recipe="w8a8-token", strategy="minmax", calibration=str(text), n_samples=2,
                     seq_len=16, progress=False)
        result = perplexity(model, tokenizer, text, seq_len=16, windows=2, progress=False)
        assert result["perplexity"] > 1
        return
    with pytest.raises(CalibrationError, match=text.name if kind in ("binary", "latin-1") else "empty|tokens"):
        api.quantize(str(base), recipe="w8a8-token", strategy="minmax", calibration=str(text), n_samples=2,
                     seq_len=16, progress=False)
    with pytest.raises(ValueError, match=text.name if kind in ("binary", "latin-1") else "empty|tokens"):
        perplexity(model, tokenizer, text, seq_len=16, windows=2, progress=False)

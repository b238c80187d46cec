"""Models larger than memory (osengine.io.streaming): a streamed calibration holds one block at a time and writes the
same folder as an in-memory run; the streaming safetensors writer writes what safetensors reads; what streaming
cannot do, or a memory limit it cannot keep, fails early with a clear message."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")

import osengine
from osengine.io import streaming
from osengine.io.streaming import StreamingError, parse_memory, write_safetensors

from tiny_models import build, inject_outliers

torch.set_num_threads(1)
CALIBRATION = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def model_folder(root, kind, **config):
    """A 3-block model with outlier channels saved as a Hugging Face folder with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = inject_outliers(build(kind, layers=3, **config), noise=False, up_rows=False)
    model.config.architectures = [type(model).__name__]
    folder = root / f"{kind}-base"
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i + 1 for i in range(127)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    return folder


def folder_contents(folder):
    from safetensors.torch import load_file

    manifest = json.loads((folder / "osengine.json").read_text())
    for key in ("manifest_sha256", "tensors_sha256"):   # digests of the files' bytes: the tensor order differs
        manifest.pop(key)
    return load_file(str(folder / "model.safetensors")), manifest


@pytest.mark.parametrize("kind,recipe,strategy,options", [
    ("llama", "w8a8-static", "osplus", {"tie_word_embeddings": True}),
    ("qwen2", "w4a8-group", "osplus", {"weight_rounding": "gptq"}),    # an untied lm_head, GPTQ
    ("opt", "w8a8-static", "osplus", {}),                              # shifts folded into LayerNorm biases
    ("bloom", "w8a8-token", "smoothquant", {}),                        # the embeddings' own LayerNorm
])
def test_a_streamed_run_writes_the_in_memory_folder_holding_one_block_at_a_time(kind, recipe, strategy, options,
                                                                                  tmp_path, monkeypatch):
    config = {k: options.pop(k) for k in list(options) if k == "tie_word_embeddings"}
    base = model_folder(tmp_path, kind, **config)
    arguments = dict(recipe=recipe, strategy=strategy, calibration=CALIBRATION, n_samples=4, seq_len=32,
                     progress=False, **options)
    osengine.quantize(str(base), out=tmp_path / "in-memory", **arguments)

    resident = []   # blocks with real (not meta) weights whenever a block is loaded or released
    plain_load, plain_release = streaming.StreamedModel.load_block, streaming.StreamedModel.release_block

    def count(self, model):
        resident.append(sum(not next(model.get_submodule(b).parameters()).is_meta for b in self.block_names))

    def load_block(self, model, index, name):
        count(self, model)
        plain_load(self, model, index, name)

    def release_block(self, model, index, name):
        count(self, model)
        plain_release(self, model, index, name)

    monkeypatch.setattr(streaming.StreamedModel, "load_block", load_block)
    monkeypatch.setattr(streaming.StreamedModel, "release_block", release_block)
    model = osengine.quantize(str(base), out=tmp_path / "streamed", max_memory="4GiB", **arguments)
    assert resident == [0, 1] * 3 and model.osengine_report["streamed"]
    tensors, manifest = folder_contents(tmp_path / "streamed")
    want_tensors, want_manifest = folder_contents(tmp_path / "in-memory")
    assert tensors.keys() == want_tensors.keys()
    assert [k for k in tensors if not torch.equal(tensors[k], want_tensors[k])] == []
    assert manifest == want_manifest
    loaded, _ = osengine.load_model(tmp_path / "streamed")   # the folder loads and runs like any other
    reference, _ = osengine.load_model(tmp_path / "in-memory")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_limit_that_cannot_be_kept_fails_before_any_weight_is_read(tmp_path, monkeypatch):
    base = model_folder(tmp_path, "llama")

    def never(*_):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streaming.SafetensorsFolder, "tensor", never)
    with pytest.raises(StreamingError, match=r"needs about 0\.\d\d GiB \(largest block \d+ MiB in fp32, embeddings "
                                             r"\d+ MiB, activations of 4 x 32 calibration tokens\), more than "
                                             r"max_memory 0\.10 GiB: raise max_memory or reduce"):
        osengine.quantize(str(base), calibration=CALIBRATION, n_samples=4, seq_len=32, progress=False,
                          out=tmp_path / "q", max_memory="0.1GiB")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arguments,message", [
    ({"model": "module"}, "give its folder or registered name, not a module in memory"),
    ({"out": None}, "it needs the output folder"),
    ({"kind": "bert"}, "architecture bert folds migrations into the previous block's output norm"),
    ({"calibration": "generated"}, "calibration 'generated' needs the whole model"),
    ({"prefix": [1, 2]}, "a full-precision prefix is computed by the whole floating-point model"),
    ({"recipe": "w8a8-paper", "kind": "opt"}, "quantizes the attention BMM inputs"),
    ({"resume": True}, "resume is not supported together with max_memory"),
    ({"max_memory": "lots"}, "max_memory must be a size such as 1.5GiB"),
])
def test_what_streaming_cannot_do_is_refused(arguments, message, tmp_path):
    base = model_folder(tmp_path, arguments.pop("kind", "llama"))
    model = arguments.pop("model", str(base))
    model = build("llama") if model == "module" else model
    call = {"recipe": "w8a8-static", "calibration": CALIBRATION, "n_samples": 4, "seq_len": 32, "progress": False,
            "out": tmp_path / "q", "max_memory": "4GiB", **arguments}
    with pytest.raises(StreamingError, match=message):
        osengine.quantize(model, **call)
    assert not (tmp_path / "q").exists()


def test_memory_sizes():
    assert parse_memory("1.5GiB") == parse_memory("1.5G") == int(1.5 * 2 ** 30)
    assert parse_memory("1500MB") == 1500 * 10 ** 6 and parse_memory("512 MiB") == 512 * 2 ** 20
    assert parse_memory(4096) == parse_memory("4096") == 4096
    for bad in ("", "-1G", "0", "1.5 parsecs", "GiB", True):
        with pytest.raises(StreamingError, match="max_memory must be a size"):
            parse_memory(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32,
                                   torch.int64, torch.bool, torch.float64, torch.uint8])
def test_streamed_safetensors_read_back_with_safetensors(dtype, tmp_path):
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(7)
    shapes = [(), (0,), (1,), (3,), (17, 3), (2, 4095), (1, 1, 5)]
    tensors = {f"t{i}": (torch.randn(s, generator=generator) * 50).to(dtype) for i, s in enumerate(shapes)}
    table = write_safetensors(tmp_path / "x.safetensors",
                              [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()])
    assert table == {k: {"dtype": str(dtype).replace("torch.", ""), "shape": list(v.shape)}
                     for k, v in tensors.items()}
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def test_a_tensor_that_differs_from_its_announcement_is_an_error(tmp_path):
    with pytest.raises(StreamingError, match=r"tensor 'w' is torch.float32 \(3,\) where torch.float32 \(4,\) was "
                                             r"announced"):
        write_safetensors(tmp_path / "x.safetensors", [("w", torch.float32, (4,), lambda: torch.zeros(3))])

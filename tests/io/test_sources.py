"""Model sources: a GGUF file is converted once into the cache and read from there afterwards, with the same weights,
config and tokenizer; an unwritable cache or OSENGINE_CACHE_DIR=off still loads (converting every time)."""
import os

import pytest
import torch
from tests.tiny_models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers

from osengine.io import sources


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose reading (transformers' slow GGUF reader) is replaced by a tiny LLaMA; counts the reads."""
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF stand-in")
    torch.manual_seed(0)
    model = tiny_llama(tied=True, bos_token_id=1, eos_token_id=2)
    model.config.architectures = None  # as transformers leaves a GGUF model's config
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    reads = []

    def load(p, dtype):
        reads.append(p)
        return model.to(dtype), tokenizer

    monkeypatch.setattr(sources, "_load_gguf", load)
    return path, model, reads


def test_gguf_is_converted_once_and_read_back_identical(fake_gguf, tmp_path, monkeypatch):
    path, model, reads = fake_gguf
    monkeypatch.setenv("OSENGINE_CACHE_DIR", str(tmp_path / "cache"))
    first, tok1 = sources.load_fp_model(path)
    second, tok2 = sources.load_fp_model(path)
    assert len(reads) == 1
    entry = sources.gguf_cache_entry(path)
    assert entry.parent.parent == tmp_path / "cache" and (entry / "model.safetensors").is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert type(second).__name__.endswith("ForCausalLM")
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 3, 4, 2, 3]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert tok1("hello world")["input_ids"] == tok2("hello world")["input_ids"]
    assert (tok2.bos_token_id, tok2.eos_token_id) == (1, 2)


def test_a_changed_file_is_converted_again(fake_gguf, tmp_path, monkeypatch):
    path, _, reads = fake_gguf
    monkeypatch.setenv("OSENGINE_CACHE_DIR", str(tmp_path / "cache"))
    sources.load_fp_model(path)
    path.write_bytes(b"GGUF stand-in, version 2")
    os.utime(path, ns=(1, 1))
    sources.load_fp_model(path)
    assert len(reads) == 2


def test_without_a_cache_every_load_converts(fake_gguf, monkeypatch):
    path, _, reads = fake_gguf
    monkeypatch.setenv("OSENGINE_CACHE_DIR", "off")
    assert sources.gguf_cache_entry(path) is None
    sources.load_fp_model(path)
    sources.load_fp_model(path)
    assert len(reads) == 2


def test_an_unwritable_cache_warns_and_still_loads(fake_gguf, tmp_path, monkeypatch):
    path, model, reads = fake_gguf
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("OSENGINE_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not cache"):
        loaded, _ = sources.load_fp_model(path)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

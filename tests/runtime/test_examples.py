"""The generation examples, cpp/examples/02_generate (C++) and 03_c_generate (C, through the C API), as built against
the installed package by tests/run.sh, which puts them in OSENGINE_EXAMPLE_BIN_DIR: on a tiny quantized LLaMA with a
byte-level BPE trained here (non-ASCII text in its alphabet, so tokens split UTF-8 characters), the text each one
streams is the Python runtime's greedy generation decoded; bad input exits 1 with a message naming it."""
import os
import subprocess
from pathlib import Path

import pytest

BIN_DIR = os.environ.get("OSENGINE_EXAMPLE_BIN_DIR")
if not BIN_DIR:
    pytest.skip("OSENGINE_EXAMPLE_BIN_DIR is not set (tests/run.sh builds the examples against the installed "
                "package and sets it)", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from osengine import _C

if not _C.has_native_runtime():
    pytest.skip("osengine was built without the native runtime", allow_module_level=True)

from test_native import VOCAB, quantized_folder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from osengine.runtime.native import NativeTokenizer, load_native

EXAMPLES = {"cpp": "generate", "c": "c_generate"}
PROMPT = "Once upon a time, a naïve café owner"
MAX_NEW_TOKENS = 40
CORPUS = ["Once upon a time, there was a naïve café owner in Zürich.",
          "The owner made coffee, tea and crème brûlée every morning.",
          "Every evening the café was full of people reading 日本語 books 🙂.",
          "A time to read, a time to write, a time to drink coffee.",
          "There once was a little cat on a mat, and the cat sat there all day."] * 4


def example(kind: str) -> Path:
    path = Path(BIN_DIR) / EXAMPLES[kind]
    assert path.is_file(), f"{path} was not built (tests/run.sh builds it into OSENGINE_EXAMPLE_BIN_DIR)"
    return path


def run(kind: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(example(kind)), *args], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A llama w8a8-static folder (vocabulary VOCAB, eos 2) with a tokenizer.json of exactly VOCAB tokens:
    <unk> <s> </s> (ids 0, 1, 2; <s> put first by the template, like LLaMA-2), the bytes the corpus uses, merges."""
    folder = quantized_folder(tmp_path_factory.mktemp("examples"), "llama", "w8a8-static")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer.get_vocab_size() == VOCAB
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def expected_text(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy generation by the Python runtime, decoded; the end-of-sequence token ends the text."""
    model = load_native(folder)
    tokenizer = NativeTokenizer(folder)
    ids = tokenizer.encode(prompt)
    assert ids[0] == 1  # the template's <s>
    new = model.context(n_ctx=len(ids) + max_new_tokens).generate(ids, max_new_tokens=max_new_tokens)
    if new and new[-1] == model.info["eos_token_id"]:
        new = new[:-1]
    return tokenizer.decode(new)


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_example_streams_the_runtime_greedy_text(folder, kind):
    want = expected_text(folder, PROMPT, MAX_NEW_TOKENS)
    assert want  # something to compare (the tiny model rarely stops at once)
    done = run(kind, str(folder), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "2")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.endswith(b"\n")
    # Written as the tokens came; bytes that are not UTF-8 read as tokenizers' decode reads them (U+FFFD).
    assert done.stdout[:-1].decode("utf-8", "replace") == want
    assert b"tokens/s" in done.stderr


def test_both_examples_write_the_same_bytes(folder):
    args = [str(folder), "--prompt", "日本", "--max-new-tokens", "24"]
    outputs = [run(kind, *args) for kind in EXAMPLES]
    assert [done.returncode for done in outputs] == [0, 0]
    assert outputs[0].stdout == outputs[1].stdout
    assert outputs[0].stdout[:-1].decode("utf-8", "replace") == expected_text(folder, "日本", 24)


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_bad_input_exits_1_with_a_clear_message(folder, tmp_path, kind):
    missing = tmp_path / "no-such-model"
    done = run(kind, str(missing))
    assert done.returncode == 1
    message = done.stderr.decode()
    assert "error" in message and str(missing) in message, message
    assert done.stdout == b""
    done = run(kind, str(folder), "--max-new-tokens", "many")
    assert done.returncode == 1
    assert "--max-new-tokens" in done.stderr.decode()
    done = run(kind)
    assert done.returncode == 1
    assert "MODEL_DIR is missing" in done.stderr.decode()
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for file in folder.iterdir():
        if file.name != "tokenizer.json":
            (no_tokenizer / file.name).symlink_to(file)
    done = run(kind, str(no_tokenizer))
    assert done.returncode == 1
    assert str(no_tokenizer / "tokenizer.json") in done.stderr.decode()

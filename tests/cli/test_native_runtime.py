"""The commands on the native runtime (osengine/cli/native_runtime.py) and the Python API behind them
(osengine.runtime: generate, perplexity; osengine.api.verify_native), on a tiny LLaMA quantized here (w8a8-static)
with a byte-level BPE trained here (tokenizer.json): `run` streams the greedy text of the integer-exact simulation,
`eval --runtime` gives the perplexity of `eval --engine`, `check --runtime` passes (and reports a difference), and
clear errors for a missing folder, a folder without tokenizer.json, a corrupt folder, a build without the runtime."""
import json
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import osengine
from osengine import _C
from osengine.cli import main

from tiny_models import build

# ASCII words and multi-byte characters: the tiny BPE keeps most of the latter as separate byte tokens, so streaming
# has to hold back incomplete UTF-8
WORDS = ["the", "city", "river", "king", "over", "and", "of", "a", "was", "built", "été", "café", "日本", "東京",
         "🙂", "naïve", "Straße", "on", "in", "it"]
PROMPT = "the city of 日本 was"


def corpus(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not _C.has_native_runtime():
        pytest.skip("osengine was built without the native runtime")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([corpus(400, 0)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    vocab = tok.get_vocab_size()
    model = build("llama", hidden_size=64, layers=2, vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, eos_token_id=0, bos_token_id=0)
    with torch.no_grad():  # outlier channels in the norms, as real models have
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[3, 17]] = torch.tensor([12.0, -9.0])
    root = tmp_path_factory.mktemp("native-cli")
    calib = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(1))
    osengine.quantize(model, recipe="w8a8-static", strategy="minmax", calibration=calib, tokenizer=fast,
                      n_samples=4, seq_len=32, out=root / "q", progress=False)
    (root / "text.txt").write_text(corpus(1500, 1) + "\n")
    return root


def simulation(folder):
    from osengine.quant.layers import set_integer_exact
    from osengine.runtime.simulate import simulate_folded_prologues

    model, tokenizer = osengine.load_model(folder)
    engine, _ = osengine.load(folder)
    set_integer_exact(model)
    simulate_folded_prologues(model, engine)
    return model, tokenizer


class Recorder:
    """sys.stdout that keeps each write."""

    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return len(s)

    def flush(self):
        pass


def test_run_streams_the_greedy_text_of_the_simulation(folder, monkeypatch, capsys):
    q = folder / "q"
    sim, hf = simulation(q)
    ids = hf(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = sim.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids),
                              eos_token_id=0, pad_token_id=0)[0, ids.shape[1]:].tolist()
    want = hf.decode(greedy, skip_special_tokens=True)
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["run", str(q), "--prompt", PROMPT, "--max-new-tokens", "20", "--threads", "1"]) == 0
    streamed = "".join(out.writes)
    assert streamed == want + "\n"
    assert len(out.writes) > 5  # piece by piece (a random model writes random bytes: U+FFFD where decode has them)
    err = capsys.readouterr().err
    assert f"prompt tokens {ids.shape[1]}, new tokens {len(greedy)}, prefill " in err and "tok/s" in err
    # the Python API gives the same text
    from osengine.runtime import generate

    assert generate(str(q), PROMPT, 20) == want


def test_text_stream_holds_back_incomplete_utf8(folder):
    from osengine.runtime import TextStream, load_native_tokenizer

    tokenizer = load_native_tokenizer(folder / "q")
    text = "über 日本 🙂 Straße"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the characters span several tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # somewhere a token ended inside a character and was held back
    # bytes that never complete read as U+FFFD at the end, as decode does
    broken = TextStream(tokenizer)
    lead = next(i for i in range(tokenizer.vocab_size) if tokenizer.token_to_piece(i) == b"\xe6")
    assert broken.push(lead) == "" and broken.flush() == "\ufffd"


def test_generate_with_sampling_and_on_a_context(folder):
    from osengine.runtime import generate, generate_with_stats, load_native

    model = load_native(folder / "q")
    a = generate(model, PROMPT, 12, temperature=0.9, top_k=20, seed=7)
    assert a == generate(model, PROMPT, 12, temperature=0.9, top_k=20, seed=7)
    context = model.context(n_ctx=64)
    g = generate_with_stats(context, model.tokenizer.encode(PROMPT), 8)
    assert context.n_past == len(g.prompt_tokens) + len(g.new_tokens) - 1
    assert g.text == generate(model, PROMPT, 8) and g.prefill_seconds > 0
    with pytest.raises(ValueError, match="do not fit the context"):
        generate(context, PROMPT, 100)
    with pytest.raises(ValueError, match="the prompt gives no tokens"):
        generate(model, "", 4)


def test_the_token_callback_stops_and_raises_through_the_runtime(folder):
    from osengine.runtime import generate, load_native

    model = load_native(folder / "q")
    ids = model.tokenizer.encode(PROMPT)
    seen = []
    new = model.context(n_ctx=64).generate(ids, 10, on_token=lambda t: seen.append(t) or len(seen) < 3)
    assert new == seen and len(new) == 3  # False from the callback stops after that token

    class Stop(Exception):
        pass

    def boom(piece):
        raise Stop(piece)

    context = model.context(n_ctx=64)
    with pytest.raises(Stop):
        generate(context, ids, 10, on_text=boom)
    context.kv_clear()  # still usable
    assert generate(context, ids, 10) == generate(model, ids, 10)


def test_eval_runtime_equals_the_engine_perplexity(folder, capsys):
    q, text = str(folder / "q"), str(folder / "text.txt")
    common = ["--ppl", text, "--seq-len", "64", "--windows", "3", "--json"]
    assert main(["eval", q, "--engine", *common]) == 0
    engine = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", q, "--runtime", "--threads", "1", *common]) == 0
    runtime = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runtime["runtime"] and runtime["windows"] == engine["windows"] == 3
    assert runtime["tokens"] == engine["tokens"] == 3 * 63
    assert runtime["perplexity"] == pytest.approx(engine["perplexity"], rel=1e-4)
    assert main(["eval", q, "--runtime", "--ppl", text, "--seq-len", "64", "--windows", "2"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


def test_eval_runtime_reads_a_crlf_file_as_eval_does(folder, tmp_path, capsys):
    """The runtime's perplexity is over the same tokens as eval's: a CRLF file keeps its \r on both (WikiText-2's
    raw files can come with CRLF line ends), and a file that is not UTF-8 is refused by both."""
    q = str(folder / "q")
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes((folder / "text.txt").read_bytes().replace(b" ", b"\r\n", 40))
    common = ["--ppl", str(crlf), "--seq-len", "64", "--windows", "3", "--json"]
    assert main(["eval", q, "--engine", *common]) == 0
    engine = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", q, "--runtime", "--threads", "1", *common]) == 0
    runtime = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runtime["tokens"] == engine["tokens"]
    assert runtime["perplexity"] == pytest.approx(engine["perplexity"], rel=1e-4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 200)
    assert main(["eval", q, "--runtime", "--ppl", str(latin1)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_check_runtime_passes_and_reports(folder, capsys):
    assert main(["check", str(folder / "q"), "--runtime", "--tokens", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "the native runtime and the integer-exact simulation agree: identical" in out and "median" in out
    assert main(["check", str(folder / "q"), "--runtime", "--tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_identical"] and result["runtime_tokens"] == result["simulation_tokens"]
    assert result["logits_median_rel_diff"] <= 1e-5 and result["logits_max_rel_diff"] <= 1e-3
    assert result["logits_first_above_1e-3"] is None and result["positions"] == result["prompt_tokens"] + 7


def test_check_runtime_fails_when_tokens_differ(folder, monkeypatch, capsys):
    from osengine.runtime.native import NativeContext

    original = NativeContext.generate

    def flipped(self, prompt, max_new_tokens, **kw):
        tokens = original(self, prompt, max_new_tokens, **kw)
        tokens[3] = (tokens[3] + 1) % self.model.info["n_vocab"]
        return tokens

    monkeypatch.setattr(NativeContext, "generate", flipped)
    assert main(["check", str(folder / "q"), "--runtime", "--tokens", "8"]) == 1
    out = capsys.readouterr().out
    assert "greedy tokens DIFFER from new token 3" in out and "logit gap" in out


def test_corrupt_folder_gives_a_clear_error(folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(folder / "q", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    for argv in (["check", str(bad), "--runtime"], ["run", str(bad), "--prompt", "x"],
                 ["eval", str(bad), "--runtime", "--ppl", str(folder / "text.txt")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"osengine {argv[0]}: error:" in err and "truncated" in err, err


def test_errors(folder, tmp_path, monkeypatch, capsys):
    q = str(folder / "q")

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "does not exist" in error(["run", str(tmp_path / "nope"), "--prompt", "x"])
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(folder / "q", no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in error(["run", str(no_tokenizer), "--prompt", "x"])
    assert "has no tokenizer.json" in error(["eval", str(no_tokenizer), "--runtime", "--ppl",
                                             str(folder / "text.txt")])
    assert "needs a text file" in error(["eval", q, "--runtime", "--ppl", "generated"])
    assert "not both" in error(["eval", q, "--runtime", "--engine", "--ppl", str(folder / "text.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "the text is empty" in error(["eval", q, "--runtime", "--ppl", str(empty)])
    short = tmp_path / "short.txt"
    short.write_text("the city")
    assert "fewer than one window of 512" in error(["eval", q, "--runtime", "--ppl", str(short)])
    assert "--max-new-tokens must be positive" in error(["run", q, "--prompt", "x", "--max-new-tokens", "0"])

    from osengine.runtime.native import NativeContext

    def nan_logits(self, tokens, all_logits=False):
        return np.full((len(tokens) if all_logits else 1, self.model.info["n_vocab"]), np.nan, np.float32)

    monkeypatch.setattr(NativeContext, "decode", nan_logits)
    assert "logits are not finite (NaN or inf) in window 0 at position 0" in error(
        ["eval", q, "--runtime", "--ppl", str(folder / "text.txt"), "--seq-len", "64"])


def test_load_options_are_forwarded(folder, monkeypatch, capsys):
    import osengine.runtime.native as native

    seen = []
    original = native.load_native

    def recording(directory, **options):
        seen.append(options)
        return original(directory)

    monkeypatch.setattr(native, "load_native", recording)
    q = str(folder / "q")
    assert main(["run", q, "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
    assert main(["run", q, "--prompt", PROMPT, "--max-new-tokens", "2", "--quantize-embeddings"]) == 0
    assert seen == [{"quantize_embeddings": False}, {"quantize_embeddings": True}]
    monkeypatch.setattr(native, "load_native", original)
    assert main(["eval", q, "--quantize-embeddings", "--ppl", str(folder / "text.txt")]) == 2
    assert "--quantize-embeddings applies to eval --runtime" in capsys.readouterr().err


def test_a_build_without_the_runtime_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_C, "has_native_runtime", lambda: False)
    for argv in (["run", str(tmp_path), "--prompt", "x"], ["eval", str(tmp_path), "--runtime", "--ppl", "f.txt"],
                 ["check", str(tmp_path), "--runtime"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "built without the native runtime" in err and "OSENGINE_RUNTIME=ON" in err, err


def test_perplexity_api_checks_its_input(folder):
    from osengine.runtime import perplexity

    with pytest.raises(ValueError, match="the text is empty"):
        perplexity(folder / "q", "")
    with pytest.raises(ValueError, match="seq_len must be an integer of at least 2"):
        perplexity(folder / "q", "the city", seq_len=1)
    result = perplexity(folder / "q", (folder / "text.txt").read_text(), seq_len=32, max_windows=None)
    assert result["windows"] > 3 and np.isfinite(result["perplexity"])


def test_run_and_eval_runtime_do_without_torch(folder):
    """`osengine run` and `eval --runtime` load neither torch nor transformers (a fresh interpreter)."""
    import os
    import subprocess

    code = ("import sys; from osengine.cli import main; "
            f"assert main(['run', {str(folder / 'q')!r}, '--prompt', 'the city', '--max-new-tokens', '4']) == 0; "
            f"assert main(['eval', {str(folder / 'q')!r}, '--runtime', '--ppl', {str(folder / 'text.txt')!r}, "
            "'--seq-len', '32', '--windows', '1', '--json']) == 0; "
            "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "assert not loaded, loaded")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

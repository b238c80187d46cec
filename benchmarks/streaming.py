"""A model larger than the memory limit, quantized block by block (not a CI test; tests/io/test_streaming.py checks
the streamed folder against the in-memory one on tiny models).

The model is randomly initialised with TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 key-value heads, untied lm_head) and SmolLM2's vocabulary (49152, so that SmolLM2's tokenizer reads the calibration
text): 1.26e9 parameters, written once as fp32 safetensors (about 4.7 GB) to --folder. It is then quantized by
`osengine quantize FOLDER --max-memory LIMIT --out OUT` in a child process, whose peak resident memory (ru_maxrss) and
wall time are reported together with the estimate that max_memory was checked against.

    python benchmarks/streaming.py                                 # osplus w8a8-static, 1.5GiB, 4 x 512 tokens
    python benchmarks/streaming.py --samples 8 --json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OSENGINE_DATA", ROOT.parent / "shared" / "data"))
WIKI_CALIB = DATA / "wikitext-2" / "valid.txt"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)


def make_model(folder: Path) -> None:
    """The random TinyLlama-shaped model, written tensor by tensor so that writing it needs one block at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from osengine.io.sources import load_fp_model

    _, tokenizer = load_fp_model("smollm2-135m")   # its tokenizer reads the calibration text
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"], **SHAPE)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    generator = torch.Generator().manual_seed(0)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "lm_head.weight": (config.vocab_size, h), "model.norm.weight": (h,)}}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shards[f"model-{layer:05d}.safetensors"] = {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    for file, tensors in shards.items():
        out = {}
        for name, shape in tensors.items():
            if len(shape) == 1:   # norms: ones, with a few outlier channels as trained LLaMAs have
                t = torch.ones(shape)
                t[[7, 300, 1500]] = torch.tensor([12.0, -9.0, 20.0])
            else:
                t = torch.randn(shape, generator=generator) * 0.02
            out[name] = t
        save_file(out, str(staging / file), metadata={"format": "pt"})
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.rename(staging, folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=str(Path(os.environ.get("OSENGINE_CACHE_DIR", Path.home() / ".cache" /
                                                               "osengine")) / "tinyllama-shaped-random"))
    p.add_argument("--recipe", default="w8a8-static")
    p.add_argument("--strategy", default="osplus")
    p.add_argument("--option", action="append", metavar="KEY=VALUE")
    p.add_argument("--max-memory", default="1.5GiB")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", help="keep the quantized folder here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the random model to {folder} (once) ...", file=sys.stderr)
        make_model(folder)
    work = Path(tempfile.mkdtemp(prefix="osengine-streaming-bench-"))
    out = Path(args.keep) if args.keep else work / "q"
    command = [sys.executable, "-m", "osengine.cli", "quantize", str(folder), "--recipe", args.recipe, "--strategy",
               args.strategy, "--calib", str(WIKI_CALIB), "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--max-memory", args.max_memory, "--threads", str(args.threads), "--json", "--out",
               str(out), "--overwrite"]
    for option in args.option or []:
        command += ["--option", option]
    try:
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.time() - started
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        manifest = json.loads((out / "osengine.json").read_text())
        row = {"model": "TinyLlama-1.1B shape, random, SmolLM2 vocabulary", "source_gb": folder_bytes(folder) / 1e9,
               "recipe": args.recipe, "strategy": args.strategy, "samples": args.samples, "seq_len": args.seq_len,
               "threads": args.threads, "max_memory": args.max_memory, "peak_rss_mib": peak,
               "peak_rss_mib_reported": summary["peak_rss_mib"], "seconds": seconds,
               "calibration_seconds": summary["calibration_seconds"], "output_gb": folder_bytes(out) / 1e9,
               "quantized_linears": len(manifest["layers"])}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{row['model']}: {row['source_gb']:.2f} GB of fp32 safetensors, {args.strategy} {args.recipe}, "
              f"{args.samples} x {args.seq_len} calibration tokens, {args.threads} threads, --max-memory "
              f"{args.max_memory}\n")
        print("| peak RSS MiB | wall s | calibration s | output GB | quantized linears |")
        print("|---|---|---|---|---|")
        print(f"| {peak:.0f} | {seconds:.0f} | {row['calibration_seconds']:.0f} | {row['output_gb']:.2f} | "
              f"{row['quantized_linears']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

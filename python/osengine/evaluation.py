"""Evaluation: perplexity over non-overlapping windows of a text file, sentence embeddings for probes, and an
optional lm-evaluation-harness adapter."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibrate.data import generated_samples, read_text_file
from .calibrate.prefix import run_after_prefix


class EvaluationError(ValueError):
    pass


GENERATED_SEED = 1234  # differs from the calibration seed, so evaluation text is not calibration text


@torch.no_grad()
def perplexity_on_windows(model, windows: torch.Tensor, progress: bool = True,
                          prefix: Optional[Sequence[int]] = None) -> dict:
    """exp(mean NLL) of the next-token predictions inside each row of `windows` [n, seq_len]. A model quantized
    behind a prefix reads the prefix's stored keys and values in front of every window (calibrate/prefix.py);
    `prefix` (token ids) puts those tokens in front of every window instead (e.g. the floating-point model behind
    the prefix a quantized one uses). Only the window's own predictions count, as without one."""
    device = next(model.parameters()).device
    explicit = [int(t) for t in prefix] if prefix is not None else None
    front = torch.tensor(explicit or [], dtype=torch.long, device=device).unsqueeze(0)
    nll, count, t0 = 0.0, 0, time.time()
    for window in tqdm(windows, desc="perplexity", disable=not progress):
        window = window.unsqueeze(0).to(device)
        if explicit:
            ids = torch.cat([front, window], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, len(explicit):].float()
        else:
            logits = run_after_prefix(model, window).logits.float()
        nll += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    mean = nll / count
    used = explicit if explicit is not None else list(getattr(model, "osengine_prefix", None) or [])
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]), "tokens": count, "seconds": time.time() - t0, "prefix": used}


@torch.no_grad()
def perplexity(model, tokenizer, text_file, seq_len: int = 512, windows: Optional[int] = 16,
               progress: bool = True, generator_model=None, prefix: Optional[Sequence[int]] = None) -> dict:
    """Perplexity over the first `windows` non-overlapping windows of `seq_len` tokens of a text file (all when
    None). text_file "generated": `windows` samples written by `generator_model` (default: `model`; give the FP
    model when evaluating a quantized one), for machines without any text at hand. `prefix`: see
    perplexity_on_windows."""
    if seq_len < 2:
        raise EvaluationError(f"seq_len must be at least 2, got {seq_len}")
    if str(text_file) == "generated":

        ids = generated_samples(generator_model or model, tokenizer, windows or 16, seq_len, seed=GENERATED_SEED,
                                progress=progress)
        return {**perplexity_on_windows(model, ids, progress, prefix), "text": "generated"}
    path = Path(text_file)
    if not path.is_file():
        raise EvaluationError(f"--ppl file {str(path)!r} does not exist (or say 'generated')")
    text = read_text_file(path, "--ppl file", EvaluationError)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seq_len
    if available == 0:
        raise EvaluationError(f"{path} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    n = available if windows is None else min(windows, available)
    return {**perplexity_on_windows(model, ids[: n * seq_len].reshape(n, seq_len), progress, prefix),
            "text": str(path)}


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: Sequence[str], batch_size: int = 64,
                        max_length: int = 128, progress: bool = True) -> torch.Tensor:
    """Mean-pooled last hidden states (the sentence-transformers recipe of all-MiniLM-L6-v2)."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(sentences), batch_size), desc="embedding", disable=not progress):
        batch = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def lm_eval_model(model, tokenizer, batch_size: int = 1):
    """Wrap a (fake-quantized) model for lm-evaluation-harness (optional extra `eval`):
        import lm_eval; lm_eval.simple_evaluate(model=lm_eval_model(m, tok), tasks=["piqa"])"""
    if getattr(model, "osengine_prefix_kv", None):
        raise EvaluationError(f"lm-evaluation-harness calls the model without the prefix {model.osengine_prefix} "
                              "it was quantized behind (its keys and values are a fixed start of the KV cache), so "
                              "its scores would not be this model's: quantize with prefix 'none' to run lm-eval")
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise EvaluationError("lm-evaluation-harness is not installed: pip install 'osengine[eval]'") from None
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_lm_eval(model, tokenizer, tasks: Sequence[str], limit: Optional[int] = None) -> dict:
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm_eval_model(model, tokenizer), tasks=list(tasks), limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in res["results"].items()}

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

from .calibrate.data import generated_samples


class EvaluationError(ValueError):
    pass


GENERATED_SEED = 1234  # differs from the calibration seed, so evaluation text is not calibration text


def model_prefix(model, prefix: Optional[Sequence[int]] = None) -> list:
    """The full-precision prefix a model runs behind (`prefix` if given, else the model's own from calibration)."""
    chosen = (getattr(model, "osengine_prefix", None) or []) if prefix is None else prefix
    return [int(t) for t in chosen]


@torch.no_grad()
def perplexity_on_windows(model, windows: torch.Tensor, progress: bool = True,
                          prefix: Optional[Sequence[int]] = None) -> dict:
    """exp(mean NLL) of the next-token predictions inside each row of `windows` [n, seq_len]. A model calibrated
    behind a full-precision prefix (model.osengine_prefix, or `prefix`) reads it in front of every window; only
    the window's own predictions count, as without one."""
    device = next(model.parameters()).device
    prefix = model_prefix(model, prefix)
    front = torch.tensor(prefix, dtype=torch.long, device=device).unsqueeze(0)
    nll, count, t0 = 0.0, 0, time.time()
    for window in tqdm(windows, desc="perplexity", disable=not progress):
        window = window.unsqueeze(0).to(device)
        ids = torch.cat([front, window], dim=1) if prefix else window
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, len(prefix):].float()
        nll += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]), "tokens": count, "seconds": time.time() - t0, "prefix": prefix}


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
    text = path.read_text(encoding="utf-8", errors="replace")
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

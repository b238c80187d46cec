"""Calibration data: text files, generated samples, sentence lists or token ids, as token-id batches (with a mask of
the real tokens where samples are padded)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm


class CalibrationError(ValueError):
    """Calibration data is missing, empty, too short or not finite."""


def read_text_file(path: Path, what: str, error: type = CalibrationError) -> str:
    """The UTF-8 text of `path`; `error` naming the file (as `what`) when it is not UTF-8 or looks binary, instead of
    calibrating or evaluating on replacement characters."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    "convert it to UTF-8 first") from None
    if "\x00" in text:
        raise error(f"{what} {str(path)!r} looks binary (it contains NUL bytes), not text")
    return text


def text_samples(text: str, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n_samples windows of seq_len tokens drawn (without overlap, reproducibly) from the tokenized text."""
    if not text.strip():
        raise CalibrationError("calibration text is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 8:
        raise CalibrationError(f"calibration text has only {ids.numel()} tokens; need at least 8")
    seq_len = min(seq_len, ids.numel())
    windows = ids.numel() // seq_len
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=g)[:n_samples].sort().values
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in chosen.tolist()])


class _GenerationProgress:
    """A `generate` streamer that only advances a progress bar: one step per generated token (all samples)."""

    def __init__(self, steps: int, disable: bool):
        self.bar = tqdm(total=steps, desc="generating samples", unit="tok", disable=disable)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands the prompt over first
            self.prompt_seen = True
            return
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


@torch.no_grad()
def generated_samples(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                      progress: bool = False) -> torch.Tensor:
    """Calibration text written by the model itself, starting from its BOS token (no data needed)."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise CalibrationError("calibration 'generated' needs a causal language model; "
                               "give a text file (--calib FILE) for encoders")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise CalibrationError("calibration 'generated' needs a tokenizer with a BOS or EOS token")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    start = torch.full((n_samples, 1), bos, dtype=torch.long, device=device)
    out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=50, top_p=0.95,
                         max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=bos,
                         eos_token_id=None, streamer=_GenerationProgress(seq_len, disable=not progress))
    return out[:, 1:seq_len + 1].cpu()


def sentence_samples(sentences: Sequence[str], tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> dict:
    """n_samples items of `sentences` (drawn reproducibly, kept in order), each tokenized on its own the way an
    encoder sees it at inference ([CLS] ... [SEP] for BERT), truncated to seq_len and padded; `attention_mask`
    marks the real tokens (padding is excluded from every calibration statistic)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(sentences), generator=g)[:n_samples].sort().values
    enc = tokenizer([sentences[i] for i in chosen.tolist()], padding=True, truncation=True, max_length=seq_len,
                    return_tensors="pt")
    if enc["input_ids"].numel() == 0 or not enc["attention_mask"].any():
        raise CalibrationError("calibration sentences produced no tokens")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def _is_encoder(model) -> bool:
    return not (hasattr(model, "can_generate") and model.can_generate())


def load_calibration(source, model, tokenizer, n_samples: int = 16, seq_len: int = 512,
                     per_sample: Optional[bool] = None, progress: bool = False):
    """source: a text file path, "generated", a list of strings, an integer tensor of token ids [n, T], or a dict
    {"input_ids": [n, T], "attention_mask": [n, T]} (padded samples).

    A list of strings is cut into n_samples windows of seq_len tokens of the joined text (language models), or,
    with per_sample (the default for encoders, which never see text across sentence boundaries nor without their
    special tokens), tokenized item by item into n_samples padded samples. Returns token ids [n, T], or a dict
    with an attention mask when the samples are padded."""
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    if isinstance(source, dict):
        ids, mask = source.get("input_ids"), source.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor) or ids.shape != mask.shape \
                or ids.dim() != 2:
            raise CalibrationError("calibration dict must hold 'input_ids' and 'attention_mask' tensors of the same "
                                   "shape [n, T]")
        if ids.is_floating_point():
            raise CalibrationError("calibration 'input_ids' must hold integer token ids")
        if ids.numel() == 0 or not mask.any():
            raise CalibrationError("calibration tensor is empty")
        return {"input_ids": ids.long(), "attention_mask": mask.long()}
    if isinstance(source, torch.Tensor):
        if source.is_floating_point():
            raise CalibrationError("calibration tensor must hold integer token ids, got a floating-point tensor"
                                   + (" with NaN values" if torch.isnan(source).any() else ""))
        if source.numel() == 0:
            raise CalibrationError("calibration tensor is empty")
        return source.reshape(-1, source.shape[-1]).long()
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(s, str) for s in source):
            raise CalibrationError("calibration list must be a non-empty list of strings")
        if per_sample if per_sample is not None else _is_encoder(model):
            return sentence_samples(source, tokenizer, n_samples, seq_len)
        return text_samples("\n\n".join(source), tokenizer, n_samples, seq_len)
    if isinstance(source, (str, Path)):
        if str(source) == "generated":
            return generated_samples(model, tokenizer, n_samples, seq_len, progress=progress)
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(f"calibration file {str(path)!r} does not exist (or say 'generated')")
        return text_samples(read_text_file(path, "calibration file"), tokenizer, n_samples, seq_len)
    raise CalibrationError(f"calibration must be a file path, 'generated', a list of strings or token ids; "
                           f"got {type(source).__name__}")


def calibration_batches(token_ids, batch_size: int, device) -> tuple:
    """Model inputs per batch, and per batch the [B, T] boolean mask of real (non-padding) tokens, or None when
    the batch has no padding. Padded batches are trimmed to their longest sample."""
    if isinstance(token_ids, dict):
        ids, mask = token_ids["input_ids"], token_ids["attention_mask"]
    else:
        ids, mask = token_ids, torch.ones_like(token_ids)
    batches, masks = [], []
    for i in range(0, ids.shape[0], batch_size):
        b_ids, b_mask = ids[i:i + batch_size], mask[i:i + batch_size]
        used = b_mask.any(0).nonzero()
        end = int(used.max()) + 1 if used.numel() else b_ids.shape[1]
        b_ids, b_mask = b_ids[:, :end].to(device), b_mask[:, :end].to(device)
        batches.append({"input_ids": b_ids, "attention_mask": b_mask})
        masks.append(None if bool(b_mask.all()) else b_mask.bool())
    return batches, masks

"""Load and save causal LMs and tokenizers from a Hub id or a local directory, the same way."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pesc.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(name_or_path: str) -> str:
    """Local paths must exist; anything else is treated as a Hub id."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]:
        raise ConfigError(f"model path {name_or_path!r} does not exist")
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(_resolve(name_or_path))
    except OSError as e:
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def require_shared_vocab(teacher: str, vocab: int, what: str) -> None:
    """Raise ConfigError unless the teacher's tokenizer has `vocab` entries (one shared vocabulary);
    `what` names what needs it (e.g. "distillation here")."""
    if len(load_tokenizer(teacher)) != vocab:
        raise ConfigError(f"teacher {teacher} and student tokenizers differ; {what} needs one shared vocabulary")


def load_model(name_or_path: str, dtype: str = "float32", device: str | None = None):
    """A causal LM in eval mode on `device` (default: cuda if available, else cpu)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(_resolve(name_or_path), dtype=DTYPES[dtype])
    except OSError as e:
        raise ConfigError(f"cannot load model {name_or_path!r}: {e}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def vocab_width(tokenizer) -> int:
    """Number of real tokens; logits wider than this are padding and get sliced off."""
    return len(tokenizer)

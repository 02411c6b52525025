"""transformers.Trainer subclasses: supervised fine-tuning and distillation.

Both normalise by the number of target tokens across gradient accumulation (`num_items_in_batch`),
so a long reply and a short one weigh the same per token whatever the accumulation setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from pesc.data.examples import IGNORE_INDEX, Example, collate
from pesc.losses import DistillLoss, TeacherSignal


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        return collate(rows, self.pad_id)


def training_args(output_dir: str, *, steps: int, lr: float, batch_size: int, grad_accum: int = 1,
                  seed: int = 0, warmup_ratio: float = 0.05, weight_decay: float = 0.0,
                  logging_steps: int = 10, save_steps: int | None = None, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        warmup_steps=max(0, int(round(warmup_ratio * steps))), weight_decay=weight_decay,
        lr_scheduler_type="cosine", logging_steps=logging_steps, seed=seed, data_seed=seed,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), **extra)


def token_ce(logits: torch.Tensor, labels: torch.Tensor, num_items) -> torch.Tensor:
    """Cross-entropy summed over target tokens of shifted logits, divided by `num_items` (float32)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][mask].float(), shift_labels[mask], reduction="sum")
    return ce / num_items


class SFTTrainer(Trainer):
    """Response-token cross-entropy (labels are -100 outside the supporter reply)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        n = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
        loss = token_ce(out.logits, labels, n)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss


class DistillTrainer(Trainer):
    """total = (1 - alpha) * CE + alpha * D(teacher, student), D from the loss registry.

    The teacher runs under no_grad in eval mode. Extra trainable parameters of the loss (an OT
    projection, layer maps) join the optimizer as their own parameter group.
    """

    def __init__(self, *args, teacher, distill_loss: DistillLoss, alpha: float = 0.5,
                 vocab_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.distill_loss = distill_loss.to(self.args.device)
        self.alpha = alpha
        self.vocab_size = vocab_size
        self.loss_is_scaled_for_ga = True
        self._parts: dict[str, list[float]] = {}

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        extra = [p for p in self.distill_loss.parameters() if p.requires_grad]
        if extra and not any(p is q for g in opt.param_groups for p in g["params"] for q in extra[:1]):
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
        return opt

    def teacher_signal(self, inputs, need_hidden: bool) -> TeacherSignal:
        with torch.no_grad():
            out = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               output_hidden_states=need_hidden)
        return TeacherSignal(logits=out.logits[:, :-1],
                             hidden_states=out.hidden_states if need_hidden else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        need_hidden = self.distill_loss.needs_hidden_states
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=need_hidden)
        mask = labels[:, 1:] != IGNORE_INDEX
        n = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        ce = token_ce(out.logits, labels, n)
        teacher = self.teacher_signal(inputs, need_hidden)
        unwrapped = self.accelerator.unwrap_model(model)
        d = self.distill_loss(out.logits[:, :-1], teacher, mask, num_items=n,
                              student_hidden=out.hidden_states if need_hidden else None,
                              student_embeddings=unwrapped.get_input_embeddings().weight,
                              teacher_embeddings=self.teacher.get_input_embeddings().weight)
        loss = (1 - self.alpha) * ce + self.alpha * d.value
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._parts.setdefault("ce", []).append(float(ce.detach()))
        self._parts.setdefault("distill", []).append(float(d.value.detach()))
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        for k, v in self._parts.items():
            if v:
                logs[f"{k}_loss"] = round(sum(v) / len(v), 6)
        self._parts = {}
        super().log(logs, *args, **kwargs)

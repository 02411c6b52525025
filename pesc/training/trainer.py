"""transformers.Trainer subclasses: supervised fine-tuning and distillation.

Both normalise by the number of target tokens across gradient accumulation and across processes
(`num_items_in_batch`), so a long reply and a short one weigh the same per token whatever the
accumulation or the number of processes. Distribution (torchrun, Accelerate, DeepSpeed, FSDP),
checkpoints and logging come from `transformers.Trainer`; this module adds:

- logits only at target positions: the LM head runs on the supporter-reply positions alone (a
  forward pre-hook packs them to (1, N, H)), so no (batch x length x vocab) tensor is built for
  prompt tokens that are never targets, in the student and in a live teacher alike;
- a teacher seam: a live model or a top-k teacher cache (`pesc.training.teacher_cache`) behind one
  `teacher_signal` call, so the loss never knows where the teacher's numbers come from;
- the distillation loss's own parameters (an OT projection, layer weights) in the optimizer, in
  every checkpoint and synchronised across processes;
- a seeded per-epoch permutation sampler, so one process with batch B and P processes with batch
  B / P see the same global batches (and a resumed run the same remaining ones);
- evaluation extras (teacher-student KL, BLEU-4/ROUGE-L) from `pesc.training.evaluation`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainingArguments

from pesc.data.examples import IGNORE_INDEX, Example, collate
from pesc.errors import ConfigError
from pesc.losses import DistillLoss, TeacherSignal

LOSS_STATE_NAME = "distill_loss_state.pt"
SPLIT_IDS = {"train": 0, "eval": 1}


class ExampleDataset(Dataset):
    """Examples as Trainer rows. `split` names the teacher-cache split the rows come from."""

    def __init__(self, examples: list[Example], split: str = "train"):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        self.examples = examples
        self.split_id = SPLIT_IDS[split]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels, "example_index": i, "cache_split": self.split_id}


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        batch = collate(rows, self.pad_id)
        if rows and isinstance(rows[0], dict) and "example_index" in rows[0]:
            batch["example_index"] = torch.tensor([r["example_index"] for r in rows], dtype=torch.long)
            batch["cache_split"] = torch.tensor([r.get("cache_split", 0) for r in rows], dtype=torch.long)
        return batch


class EpochPermutationSampler(Sampler):
    """A seeded random permutation of the dataset, a new one each epoch (`set_epoch`).

    It uses no global RNG, so the order is the same on one process or many (Accelerate shards the
    batches of this one sequence across processes) and after a resume.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def training_args(output_dir: str, *, steps: int, lr: float, batch_size: int, grad_accum: int = 1,
                  seed: int = 0, warmup_ratio: float = 0.05, weight_decay: float = 0.0,
                  logging_steps: int = 10, save_steps: int | None = None, epochs: float | None = None,
                  eval_steps: int | None = None, save_total_limit: int | None = 2,
                  max_grad_norm: float = 1.0, **extra) -> TrainingArguments:
    """TrainingArguments for one stage. `epochs` (if set) replaces `steps`; `save_steps` turns on
    checkpoints; `eval_steps` periodic evaluation (needs an eval dataset)."""
    if epochs:
        schedule = dict(num_train_epochs=float(epochs), max_steps=-1)
        warmup = float(warmup_ratio) if 0 <= warmup_ratio < 1 else int(warmup_ratio)
    else:
        if steps < 1:
            raise ConfigError(f"training needs at least one step, got {steps}")
        schedule = dict(max_steps=int(steps))
        warmup = max(0, int(round(warmup_ratio * steps)))
    return TrainingArguments(
        output_dir=output_dir, learning_rate=lr, **schedule,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, warmup_steps=warmup, weight_decay=weight_decay,
        lr_scheduler_type="cosine", logging_steps=logging_steps, seed=seed, data_seed=seed,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        save_total_limit=save_total_limit,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps or None,
        prediction_loss_only=True, max_grad_norm=max_grad_norm,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), **extra)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose logits predict a label token (the last position never does)."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return pos


def _bare(model):
    """The model under DDP / DeepSpeed wrappers (a PeftModel stays a PeftModel)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def head_only_at(model, positions: torch.Tensor | None):
    """Inside the block the LM head runs only at `positions` ((B, T) bool): logits are (1, N, V).

    A forward pre-hook on the output embeddings gathers the hidden states of the target positions
    (row-major: example by example, positions ascending) before the vocabulary projection, so the
    full (B, T, V) logits never exist. Works through DDP and peft (the hook is on the module).
    """
    head = _bare(model).get_output_embeddings() if positions is not None else None
    if head is None:
        yield False
        return

    def pack(module, args):
        h = args[0]
        if h.dim() != 3 or h.shape[:2] != positions.shape:
            return None  # not the training forward (e.g. a different call inside): leave it alone
        return (h[positions].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pack)
    try:
        yield True
    finally:
        handle.remove()


def packed_logits(model, inputs, positions: torch.Tensor, *, need_hidden: bool = False):
    """(logits (1, N, V) at the target positions, model output). Falls back to gathering them."""
    with head_only_at(model, positions) as packed:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=need_hidden)
    logits = out.logits if packed else out.logits[positions].unsqueeze(0)
    return logits, out


def token_ce(logits: torch.Tensor, labels: torch.Tensor, num_items) -> torch.Tensor:
    """Cross-entropy summed over target tokens of shifted logits, divided by `num_items` (float32)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][mask].float(), shift_labels[mask], reduction="sum")
    return ce / num_items


def packed_ce(logits: torch.Tensor, labels: torch.Tensor, num_items) -> torch.Tensor:
    """Cross-entropy of packed logits (1, N, V) against the N target labels, / `num_items`."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    return F.cross_entropy(logits[0].float(), targets, reduction="sum") / num_items


class _PescTrainer(Trainer):
    """Shared behaviour: deterministic sampling, token-normalised loss, parts logging, eval extras."""

    def __init__(self, *args, evaluator=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our compute_loss divides by num_items_in_batch; make the Trainer always count it (a peft
        # wrapper or a custom model may hide the `**kwargs` the Trainer looks for).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.evaluator = evaluator
        self._parts: dict[str, list[float]] = {}
        self._eval_parts: dict[str, list[float]] = {}

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if ds is None or not hasattr(ds, "__len__"):
            return super()._get_train_sampler(train_dataset)
        return EpochPermutationSampler(len(ds), self.args.data_seed if self.args.data_seed is not None
                                       else self.args.seed)

    def _num_items(self, labels, num_items_in_batch):
        return num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()

    def _scale(self, loss, num_items_in_batch):
        # DDP averages gradients over processes; num_items_in_batch already counts all of them.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def _record(self, model, parts: dict[str, float]):
        store = self._parts if model.training else self._eval_parts
        for k, v in parts.items():
            store.setdefault(k, []).append(float(v))

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:  # a training log line: add the mean of each part since the last one
            for k, v in self._parts.items():
                if v:
                    logs[f"{k}_loss" if not k.endswith("loss") else k] = round(sum(v) / len(v), 6)
            self._parts = {}
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_parts = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        for k, v in self._eval_parts.items():
            if v:
                output.metrics[f"{metric_key_prefix}_{k}" + ("" if k.endswith("loss") else "_loss")] = \
                    round(sum(v) / len(v), 6)
        self._eval_parts = {}
        if self.evaluator is not None:
            extra = self.evaluator(self)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        return output


class SFTTrainer(_PescTrainer):
    """Response-token cross-entropy (labels are -100 outside the supporter reply)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        n = self._num_items(labels, num_items_in_batch)
        logits, out = packed_logits(model, inputs, target_positions(labels))
        loss = packed_ce(logits, labels, n)
        if not model.training:
            self._record(model, {"ce": float(loss.detach()) * float(n) / max(int(target_positions(labels).sum()), 1)})
        loss = self._scale(loss, num_items_in_batch)
        return (loss, out) if return_outputs else loss


class DistillTrainer(_PescTrainer):
    """total = (1 - alpha) * CE + alpha * D(teacher, student), D from the loss registry.

    The teacher is either a live model (eval mode, no gradients) or a `TeacherCache`: then the
    teacher is never loaded and the loss receives `TeacherSignal(topk_ids, topk_logprobs,
    rest_logmass)`; a loss that needs the full vocabulary (or hidden states) is refused at
    construction. Extra trainable parameters of the loss join the optimizer as their own group, are
    saved in every checkpoint (`distill_loss_state.pt`) and restored on resume.
    """

    def __init__(self, *args, teacher=None, distill_loss: DistillLoss, alpha: float = 0.5,
                 vocab_size: int | None = None, teacher_cache=None, **kwargs):
        if (teacher is None) == (teacher_cache is None):
            raise ConfigError("distillation needs exactly one teacher: a model or a teacher cache")
        if teacher_cache is not None:
            check_cache_compatible(distill_loss, teacher_cache)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval() if teacher is not None else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.to(self.args.device)
        self.teacher_cache = teacher_cache
        self.distill_loss = distill_loss.to(self.args.device)
        self.alpha = alpha
        self.vocab_size = vocab_size
        self._teacher_embeddings = None
        self._new_cycle = True
        self._prepare_loss()
        if distill_loss.needs_hidden_states and getattr(distill_loss, "attention", False):
            # attention maps come only from the eager implementation (SDPA/flash return none)
            for m in (self.model, self.teacher):
                if m is not None:
                    use_eager_attention(m)

    def _prepare_loss(self) -> None:
        """Let the loss create its model-dependent parameters before the optimizer is built."""
        prepare = getattr(self.distill_loss, "prepare", None)
        if prepare is None:
            return
        student = _bare(self.model)
        s_emb, t_emb = student.get_input_embeddings().weight, self.teacher_embeddings()
        s_cfg = getattr(student, "config", None)
        if self.teacher is not None:
            t_cfg = self.teacher.config
            t_hidden, t_layers = t_cfg.hidden_size, t_cfg.num_hidden_layers
        else:
            t_hidden = self.teacher_cache.manifest.get("teacher_hidden_size")
            t_layers = self.teacher_cache.manifest.get("teacher_layers")
        prepare(student_embeddings=s_emb, teacher_embeddings=t_emb,
                student_hidden_size=getattr(s_cfg, "hidden_size", None), teacher_hidden_size=t_hidden,
                student_layers=getattr(s_cfg, "num_hidden_layers", None), teacher_layers=t_layers)
        self.distill_loss.to(self.args.device)

    # --- optimizer, checkpoints, processes -------------------------------------------------------

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.distill_loss.parameters() if p.requires_grad]

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        extra = self.extra_parameters()
        known = {id(p) for g in opt.param_groups for p in g["params"]}
        extra = [p for p in extra if id(p) not in known]
        if extra:
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
        return opt

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = self.distill_loss.state_dict()
        if state and self.args.should_save:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, os.path.join(output_dir, LOSS_STATE_NAME))

    def load_loss_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, LOSS_STATE_NAME)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.args.device, weights_only=True)
            self.distill_loss.load_state_dict(state)
        elif self.distill_loss.state_dict():
            raise ConfigError(f"checkpoint {checkpoint} has no {LOSS_STATE_NAME}, but loss "
                              f"{self.distill_loss.name!r} has trainable state; cannot resume it exactly")

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        # The loss state first: the optimizer state refers to the loss's parameters too.
        if checkpoint is not None:
            self.load_loss_state(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The loss's own parameters live outside the model: the Trainer's model.zero_grad() does not
        # reach them, so clear their gradients at the start of each accumulation cycle here.
        if self._new_cycle:
            for p in self.extra_parameters():
                p.grad = None
            self._new_cycle = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the optimizer steps after this micro-batch
            self._new_cycle = True
            # Outside the DDP-wrapped model too: average their gradients (and float buffers such as
            # layer weights) over processes, as DDP does for the model.
            if self.accelerator.num_processes > 1:
                sync_module(self.distill_loss, self.accelerator.num_processes)
        return loss

    # --- the teacher seam ------------------------------------------------------------------------

    def teacher_embeddings(self):
        if self.teacher is not None:
            return self.teacher.get_input_embeddings().weight
        if self._teacher_embeddings is None:
            emb = self.teacher_cache.input_embeddings()
            self._teacher_embeddings = emb.to(self.args.device) if emb is not None else None
        return self._teacher_embeddings

    def teacher_signal(self, inputs, positions: torch.Tensor | None, need_hidden: bool,
                       need_attentions: bool = False) -> TeacherSignal:
        """The teacher at the target positions: packed (1, N, .) when `positions` is given, else the
        shifted dense logits (B, T-1, V)."""
        if self.teacher_cache is not None:
            counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(1)
            ids, logprobs, rest = self.teacher_cache.fetch(inputs["cache_split"], inputs["example_index"],
                                                           counts, device=inputs["labels"].device)
            return TeacherSignal(topk_ids=ids.unsqueeze(0), topk_logprobs=logprobs.unsqueeze(0),
                                 rest_logmass=rest.unsqueeze(0), temperature=self.teacher_cache.temperature)
        with torch.no_grad():
            if positions is not None:
                logits, out = packed_logits(self.teacher, inputs, positions, need_hidden=need_hidden)
            else:
                out = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   output_hidden_states=need_hidden, output_attentions=need_attentions)
                logits = out.logits[:, :-1]
        return TeacherSignal(logits=logits, hidden_states=out.hidden_states if need_hidden else None,
                             attentions=out.attentions if need_attentions else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        n = self._num_items(labels, num_items_in_batch)
        need_hidden = bool(self.distill_loss.needs_hidden_states)
        need_attn = need_hidden and bool(getattr(self.distill_loss, "attention", False))
        extra = {}
        # Per-position losses get packed logits (1, N, V) and an all-true mask; a loss on hidden
        # states keeps the (B, T) layout so its hidden states and mask line up.
        if need_hidden:
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        output_hidden_states=True, output_attentions=need_attn)
            s_logits, loss_mask = out.logits[:, :-1], mask
            ce = token_ce(out.logits, labels, n)
            teacher = self.teacher_signal(inputs, None, True, need_attn)
            if need_attn:
                extra["student_attentions"] = out.attentions
        else:
            positions = target_positions(labels)
            s_logits, out = packed_logits(model, inputs, positions)
            loss_mask = torch.ones(s_logits.shape[:2], dtype=torch.bool, device=s_logits.device)
            ce = packed_ce(s_logits, labels, n)
            teacher = self.teacher_signal(inputs, positions, False)
        d = self.distill_loss(s_logits, teacher, loss_mask, num_items=n,
                              student_hidden=out.hidden_states if need_hidden else None,
                              student_embeddings=_bare(model).get_input_embeddings().weight,
                              teacher_embeddings=self.teacher_embeddings(), **extra)
        loss = (1 - self.alpha) * ce + self.alpha * d.value
        # Logged parts are per-token means of this micro-batch (the values above are divided by the
        # token count of the whole accumulated, all-process batch).
        scale = float(n) / max(int(mask.sum()), 1)
        parts = {"ce": float(ce.detach()) * scale, "distill": float(d.value.detach()) * scale}
        parts.update({k: float(v) * scale for k, v in (d.parts or {}).items()
                      if k not in parts and isinstance(v, (int, float))})
        self._record(model, parts)
        loss = self._scale(loss, num_items_in_batch)
        return (loss, out) if return_outputs else loss


def use_eager_attention(model) -> None:
    bare = _bare(model)
    setter = getattr(bare, "set_attn_implementation", None)
    if setter is not None:
        setter("eager")
    else:  # pragma: no cover - older model classes
        bare.config._attn_implementation = "eager"


def check_cache_compatible(distill_loss: DistillLoss, cache) -> None:
    """Refuse, with the reason and the way out, a loss that cannot run from a top-k cache."""
    from pesc.losses import available_losses, build_loss

    problem = None
    if not getattr(distill_loss, "supports_sparse_teacher", False):
        problem = "needs the teacher's full-vocabulary logits"
    elif getattr(distill_loss, "needs_hidden_states", False):
        problem = "needs the teacher's hidden states"
    if problem is None:
        return
    ok = []
    for name in available_losses():
        try:
            cls = type(build_loss(name))
        except Exception:  # a loss that needs parameters to build: judge by its class flags
            continue
        if getattr(cls, "supports_sparse_teacher", False) and not getattr(cls, "needs_hidden_states", False):
            ok.append(name)
    hint = f"losses that accept the cache: {', '.join(ok)}" if ok else "no registered loss accepts the cache"
    raise ConfigError(f"loss {distill_loss.name!r} {problem} and cannot run from the top-k teacher cache "
                      f"{getattr(cache, 'path', '')}; distil with the live teacher (drop teacher_cache) or "
                      f"choose another loss ({hint})")


def sync_module(module: torch.nn.Module, world_size: int) -> None:
    """Average gradients of trainable parameters and floating buffers of `module` over processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)
    for b in module.buffers():
        if torch.is_floating_point(b):
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(world_size)

"""Training stages on tiny models and hand-written dialogues: token normalisation, extra loss
parameters, resume after a kill, LoRA merge, the teacher cache, periodic evaluation, config, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pesc.errors import ConfigError
from pesc.losses import DistillLoss, LossOutput, TeacherSignal
from pesc.losses import base as loss_base

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "training" / "dialogues.json"


@pytest.fixture(scope="module")
def data():
    from pesc.data.pesc_json import load_pesc
    from pesc.training.pipeline import RunData

    ds = load_pesc(FIXTURE, expected_turns=None)
    return RunData(ds[:6], ds[6:], ds[6:], "hand-written fixture (6 train, 2 held-out dialogues)")


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    """teacher-init / student-init built once; each run directory gets a copy."""
    from pesc.models.smoke import build_smoke_models

    root = tmp_path_factory.mktemp("models")
    build_smoke_models(data.train, root, teacher_layers=2, student_layers=1, hidden=32, vocab_size=512)
    return root


def new_run(models: Path, run_dir: Path) -> Path:
    for name in ("teacher-init", "student-init"):
        shutil.copytree(models / name, run_dir / name)
    return run_dir


def cfg_for(run_dir, **over):
    from pesc.training.config import load_config

    base = dict(output_dir=str(run_dir), teacher_steps=0, distill_steps=4, batch_size=4, max_length=256,
                smoke_vocab_size=512, smoke_hidden=32, smoke_teacher_layers=2, student_layers=1,
                eval_examples=0, eval_generate_dialogues=0, eval_dialogues=0, logging_steps=1, lr=3e-3)
    base.update(over)
    return load_config("smoke", None, base)


def weights(path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


class ScaledKL(DistillLoss):
    """KL to a student whose logits are scaled by a trainable factor: a loss with its own parameter
    (created in prepare(), like an OT projection) and a buffer."""

    def __init__(self, temperature: float = 1.0, vocab_size: int | None = None):
        super().__init__(temperature)
        self.vocab_size = vocab_size
        self.log_scale = None
        self.register_buffer("calls", torch.zeros(()))

    def prepare(self, **kw):
        if self.log_scale is None:
            self.log_scale = torch.nn.Parameter(torch.zeros(()))
        return self

    def forward(self, student_logits, teacher, mask, num_items=None, **_):
        self.check_teacher(teacher)
        s = student_logits[mask].float() * self.log_scale.exp()
        t = teacher.logits[mask].float()
        lq, lp = torch.log_softmax(s / self.temperature, -1), torch.log_softmax(t / self.temperature, -1)
        total = (lp.exp() * (lp - lq)).sum()
        self.calls += 1
        value = total / (num_items if num_items is not None else mask.sum())
        return LossOutput(value, {"scaled_kl": float(value.detach())})


class HiddenLoss(ScaledKL):
    supports_sparse_teacher = True
    needs_hidden_states = True


@pytest.fixture
def scaled_kl(monkeypatch):
    monkeypatch.setitem(loss_base._REGISTRY, "test_scaled_kl", ScaledKL)
    ScaledKL.name = "test_scaled_kl"
    return "test_scaled_kl"


class KillAt(TrainerCallback):
    """Raises at the end of optimizer step `step`, like a process killed there (no later checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


# --- config ---------------------------------------------------------------------------------------

def test_paper_preset_yaml_and_flags(tmp_path):
    from pesc.training.config import load_config

    c = load_config("paper")
    assert (c.teacher, c.student) == ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")
    assert (c.teacher_lora, c.student_lora, c.lora_r) == (True, True, 16)
    assert (c.temperature, c.max_length, c.lr, c.batch_size, c.grad_accum, c.epochs) == (2.0, 2048, 5e-4, 4, 16, 10)
    y = tmp_path / "run.yaml"
    y.write_text("preset: quickstart\nlr: 2.0e-4\nloss: l1\nstudent_lora: true\n")
    c = load_config(None, str(y), {"lr": "5e-5", "eval_steps": "10"})
    assert (c.preset, c.loss, c.student_lora, c.lr, c.eval_steps) == ("quickstart", "l1", True, 5e-5, 10)
    c.save(tmp_path / "saved.yaml")
    assert load_config(None, str(tmp_path / "saved.yaml")) == c


# --- trainer mechanics ----------------------------------------------------------------------------

def test_lm_head_runs_only_at_target_positions(models, data):
    from pesc.data.examples import build_examples, collate
    from pesc.models import load_model, load_tokenizer
    from pesc.training.lora import apply_lora
    from pesc.training.trainer import packed_logits, target_positions

    tok = load_tokenizer(str(models / "student-init"))
    batch = collate(build_examples(data.train[:2], tok, 256)[:3], tok.pad_token_id)
    pos = target_positions(batch["labels"])
    for model in (load_model(str(models / "teacher-init")),
                  apply_lora(load_model(str(models / "student-init")), r=4)):
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        packed, _ = packed_logits(model, batch, pos)
        assert packed.shape == (1, int(pos.sum()), full.shape[-1])
        torch.testing.assert_close(packed[0], full[pos], atol=1e-5, rtol=1e-5)


def test_loss_normalised_over_accumulation_and_parts_logged(models, data, tmp_path):
    """batch 4 x 1 and batch 2 x 2 accumulation: one token-normalised objective, the same weights."""
    from pesc.training.stages import distill

    a = distill(cfg_for(new_run(models, tmp_path / "a"), batch_size=4, grad_accum=1, distill_steps=3), data)
    b = distill(cfg_for(new_run(models, tmp_path / "b"), batch_size=2, grad_accum=2, distill_steps=3), data)
    assert max_diff(weights(tmp_path / "a" / "student"), weights(tmp_path / "b" / "student")) < 1e-5
    assert a["hyperparameters"]["steps"] == b["hyperparameters"]["steps"] == 3
    logs = [json.loads(x) for x in (tmp_path / "a" / "student" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "ce_loss" in r]
    assert len(steps) == 3
    for r in steps:  # one micro-batch per step: loss = (1 - alpha) CE + alpha D exactly (to rounding)
        assert r["loss"] == pytest.approx(0.5 * r["ce_loss"] + 0.5 * r["distill_loss"], rel=2e-3)
        assert r["distill_loss"] == r["fkl_loss"] > 0
    assert weights(tmp_path / "a" / "student").keys() == weights(tmp_path / "a" / "student-init").keys()
    assert max_diff(weights(tmp_path / "a" / "student"), weights(tmp_path / "a" / "student-init")) > 1e-4


def test_resume_after_kill_mid_epoch_gives_same_weights(models, data, tmp_path, scaled_kl):
    """LoRA with dropout (RNG), a loss with its own parameter: killed at step 7 (last checkpoint 6,
    mid-epoch: 18 examples / batch 4 = 5 steps per epoch), restarted with the same config."""
    from pesc.training.stages import distill
    from pesc.training.trainer import LOSS_STATE_NAME

    over = dict(loss=scaled_kl, distill_steps=9, save_steps=3, student_lora=True, lora_r=4, lora_dropout=0.2,
                lr=1e-2)
    full = distill(cfg_for(new_run(models, tmp_path / "full"), **over), data)
    killed = new_run(models, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        distill(cfg_for(killed, **over), data, callbacks=[KillAt(7)])
    ckpts = sorted(p.name for p in (killed / "student" / "trainer").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    saved = torch.load(killed / "student" / "trainer" / "checkpoint-6" / LOSS_STATE_NAME)
    assert float(saved["log_scale"]) != 0.0                 # the loss parameter trains and is checkpointed
    assert not (killed / "student" / "model.safetensors").exists()
    resumed = distill(cfg_for(killed, **over), data)
    assert resumed["hyperparameters"]["steps"] == full["hyperparameters"]["steps"] == 9
    # Same weights to float32 rounding (0 for full fine-tuning; ~3e-8 here, from the LoRA merge).
    assert max_diff(weights(tmp_path / "full" / "student"), weights(killed / "student")) < 1e-6
    a = torch.load(tmp_path / "full" / "student" / LOSS_STATE_NAME)
    b = torch.load(killed / "student" / LOSS_STATE_NAME)
    assert float(a["log_scale"]) == float(b["log_scale"]) != 0.0
    assert float(a["calls"]) == float(b["calls"]) == 9        # buffer restored at 6, then 3 more steps
    # A different config in the same run directory is refused, naming what changed.
    with pytest.raises(ConfigError, match="lr: 0.01 -> 0.02"):
        distill(cfg_for(killed, **{**over, "lr": 2e-2, "distill_steps": 12}), data)


def test_extra_loss_parameters_join_the_optimizer(models, data, tmp_path, scaled_kl):
    from pesc.data.examples import build_examples
    from pesc.losses import build_loss
    from pesc.models import load_model, load_tokenizer
    from pesc.training.trainer import Collator, DistillTrainer, ExampleDataset, training_args

    tok = load_tokenizer(str(models / "student-init"))
    ex = build_examples(data.train, tok, 256)
    loss = build_loss(scaled_kl)
    tr = DistillTrainer(model=load_model(str(models / "student-init")).train(),
                        args=training_args(str(tmp_path / "t"), steps=2, lr=1e-2, batch_size=4),
                        train_dataset=ExampleDataset(ex), data_collator=Collator(tok.pad_token_id),
                        teacher=load_model(str(models / "teacher-init")), distill_loss=loss, vocab_size=len(tok))
    tr.train()
    groups = tr.optimizer.param_groups
    assert any(any(p is loss.log_scale for p in g["params"]) for g in groups)
    assert float(loss.log_scale) != 0.0


def test_hidden_state_loss_gets_both_models_layers_and_keeps_its_state(models, data, tmp_path):
    """layer_emd (hidden states + attention maps, a projection and layer-weight buffers) through the
    Trainer: unpacked layout, eager attention switched on, state in checkpoints and with the student."""
    from pesc.losses import available_losses
    from pesc.training.stages import distill
    from pesc.training.trainer import LOSS_STATE_NAME

    if "layer_emd" not in available_losses():
        pytest.skip("layer_emd not registered")
    run = new_run(models, tmp_path / "run")
    r = distill(cfg_for(run, loss="layer_emd", loss_params={"attention": True}, distill_steps=3, save_steps=2,
                        alpha=1.0), data)
    assert r["hyperparameters"]["steps"] == 3
    ck = torch.load(run / "student" / "trainer" / "checkpoint-2" / LOSS_STATE_NAME)
    final = torch.load(run / "student" / LOSS_STATE_NAME)
    for state in (ck, final):
        assert {"projection.weight", "weight_student", "weight_teacher", "attention_weight_teacher"} <= set(state)
        assert float(state["weight_teacher"].sum()) == pytest.approx(1.0, abs=1e-5)
    # teacher has 2 layers: uniform start 0.5/0.5, moved by the per-step weight update
    assert not torch.allclose(final["weight_teacher"], torch.full((2,), 0.5))
    logs = [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines()]
    assert all(x["distill_loss"] > 0 for x in logs if "distill_loss" in x)


# --- LoRA ----------------------------------------------------------------------------------------

def test_lora_adapters_merge_into_plain_weights(models, data, tmp_path):
    from pesc.data.examples import build_examples, collate
    from pesc.models import load_model, load_tokenizer
    from pesc.training.lora import apply_lora, merge_and_save
    from pesc.training.stages import train_teacher

    tok = load_tokenizer(str(models / "student-init"))
    batch = collate(build_examples(data.train[:1], tok, 256), tok.pad_token_id)
    model = apply_lora(load_model(str(models / "student-init")), r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    merge_and_save(model, tok, tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not any("lora" in k for k in weights(tmp_path / "merged"))
    plain = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # The teacher stage with LoRA saves merged weights that differ from the initial teacher.
    run = new_run(models, tmp_path / "run")
    r = train_teacher(cfg_for(run, teacher_steps=3, teacher_lr=1e-2, teacher_lora=True, lora_r=4), data)
    assert r["steps"] == 3 and r["lora"] is True
    t, t0 = weights(run / "teacher"), weights(run / "teacher-init")
    assert not any("lora" in k for k in t) and max_diff(t, t0) > 1e-4
    assert (run / "teacher" / "adapter" / "adapter_config.json").exists()


# --- teacher cache --------------------------------------------------------------------------------

def test_teacher_cache_rows_shards_hash(models, data, tmp_path):
    from pesc.data.examples import Example, build_examples, collate
    from pesc.models import load_model, load_tokenizer
    from pesc.training.teacher_cache import TeacherCache, build_teacher_cache
    from pesc.training.trainer import SPLIT_IDS, packed_logits, target_positions

    tok = load_tokenizer(str(models / "teacher-init"))
    teacher = load_model(str(models / "teacher-init"))
    train = build_examples(data.train, tok, 256)
    held = build_examples(data.heldout, tok, 256)
    out = build_teacher_cache(teacher, {"train": train, "eval": held}, tmp_path / "cache", topk=16,
                              temperature=2.0, vocab_size=len(tok), pad_id=tok.pad_token_id, batch_size=5,
                              shard_positions=300, teacher_name=str(models / "teacher-init"), progress=False)
    cache = TeacherCache(out)
    info = cache.manifest["splits"]["train"]
    assert info["shards"] >= 2 and info["examples"] == len(train) and cache.temperature == 2.0
    assert isinstance(cache.split("train").ids[0], np.memmap)
    cache.check("train", train, len(tok))
    # rows = top-k of the live teacher at tau = 2, packed example by example
    idx = [4, 0, 11, 17]
    batch = collate([train[i] for i in idx], tok.pad_token_id)
    pos = target_positions(batch["labels"])
    with torch.no_grad():
        logits, _ = packed_logits(teacher, batch, pos)
    want = TeacherSignal.topk_from_logits(logits, 16, temperature=2.0)
    ids, lp, rest = cache.fetch(torch.full((4,), SPLIT_IDS["train"]), torch.tensor(idx), pos.sum(1))
    assert torch.equal(ids, want.topk_ids[0])
    torch.testing.assert_close(lp, want.topk_logprobs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rest, want.rest_logmass[0], atol=1e-4, rtol=0)
    total = torch.logaddexp(lp.logsumexp(-1), rest)       # top-k mass + rest mass = 1
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)
    # built from other data: refused with the way out
    changed = [Example(e.input_ids[:-1] + [e.input_ids[0]], e.labels, e.dialogue_id, e.turn) for e in train]
    with pytest.raises(ConfigError, match="different train data.*pesc cache-teacher"):
        cache.check("train", changed, len(tok))
    with pytest.raises(ConfigError, match="vocabulary of"):
        cache.check("train", train, len(tok) + 1)
    with pytest.raises(ConfigError, match="already exists"):
        build_teacher_cache(teacher, {"train": train}, out, topk=4, progress=False)
    (tmp_path / "broken.partial").mkdir()
    with pytest.raises(ConfigError, match="interrupted"):
        TeacherCache(tmp_path / "broken")


def test_topk_bucketed_kl_is_a_lower_bound_exact_at_full_k():
    from pesc.training.teacher_cache import sparse_kl, topk_rows

    torch.manual_seed(0)
    t, s = torch.randn(50, 40) * 3, torch.randn(50, 40) * 3
    tau = 2.0
    lp, lq = torch.log_softmax(t / tau, -1), torch.log_softmax(s / tau, -1)
    full = (lp.exp() * (lp - lq)).sum(-1)
    for k, exact in ((40, True), (8, False), (1, False)):
        ids, vals, rest = topk_rows(t, k, temperature=tau)
        kl = sparse_kl(s, ids, vals, rest, temperature=tau)
        if exact:
            torch.testing.assert_close(kl, full, atol=1e-5, rtol=1e-5)
        else:
            assert (kl <= full + 1e-6).all() and (kl >= -1e-6).all() and (kl < full - 1e-4).any()


def test_distill_from_cache_never_loads_teacher(models, data, tmp_path, monkeypatch):
    import pesc.models
    from pesc.losses import build_loss
    from pesc.training.stages import build_context, cache_teacher, distill
    from pesc.training.teacher_cache import TeacherCache
    from pesc.training.trainer import Collator, DistillTrainer, ExampleDataset, target_positions, training_args

    run = new_run(models, tmp_path / "run")
    over = dict(cache_topk=32, temperature=2.0, eval_examples=4)
    cache_dir = cache_teacher(cfg_for(run, **over), data, progress=False)
    loaded = []
    real = pesc.models.load_model
    monkeypatch.setattr(pesc.models, "load_model", lambda p, *a, **k: loaded.append(Path(p).name) or real(p, *a, **k))
    r = distill(cfg_for(run, teacher_cache=str(cache_dir), **over), data)
    assert loaded == ["student-init"]                      # the teacher is never loaded
    assert "teacher cache" in r["teacher"] and "kl_topk" in r["eval"]["after"]
    assert (run / "student" / "model.safetensors").exists()

    # One batch: the loss from the cache equals the loss from the live teacher's top-k at tau.
    ctx = build_context(cfg_for(run, **over), data)
    cache = TeacherCache(cache_dir)
    teacher = real(str(run / "teacher-init"))
    student = real(str(run / "student-init"))
    args = training_args(str(tmp_path / "t"), steps=1, lr=1e-3, batch_size=4)
    kw = dict(model=student, args=args, train_dataset=ExampleDataset(ctx.train_ex),
              data_collator=Collator(ctx.tokenizer.pad_token_id), alpha=0.5, vocab_size=ctx.vocab)
    cached = DistillTrainer(**kw, teacher_cache=cache, distill_loss=build_loss("fkl", temperature=2.0))
    live = DistillTrainer(**kw, teacher=teacher, distill_loss=build_loss("fkl", temperature=2.0))
    batch = Collator(ctx.tokenizer.pad_token_id)([ExampleDataset(ctx.train_ex)[i] for i in (3, 1, 8)])
    pos = target_positions(batch["labels"])
    dense = live.teacher_signal(batch, pos, False)
    sparse = cached.teacher_signal(batch, pos, False)
    want = TeacherSignal.topk_from_logits(dense.logits, 32, temperature=2.0)
    assert torch.equal(sparse.topk_ids, want.topk_ids)
    torch.testing.assert_close(sparse.topk_logprobs, want.topk_logprobs, atol=1e-5, rtol=0)
    loss = build_loss("fkl", temperature=2.0, vocab_size=ctx.vocab)
    s_logits = torch.randn(1, int(pos.sum()), ctx.vocab)
    m = torch.ones(1, int(pos.sum()), dtype=torch.bool)
    torch.testing.assert_close(loss(s_logits, sparse, m).value, loss(s_logits, want, m).value, atol=1e-5, rtol=1e-5)


def test_cache_refused_for_losses_that_need_the_full_teacher(models, data, tmp_path, monkeypatch):
    from pesc.training.stages import cache_teacher, distill

    monkeypatch.setitem(loss_base._REGISTRY, "test_dense_only", ScaledKL)
    monkeypatch.setitem(loss_base._REGISTRY, "test_hidden", HiddenLoss)
    run = new_run(models, tmp_path / "run")
    cache_dir = cache_teacher(cfg_for(run, cache_topk=8), data, progress=False)
    ScaledKL.name = "test_dense_only"
    with pytest.raises(ConfigError, match=r"needs the teacher's full-vocabulary logits and cannot run from the "
                                          r"top-k teacher cache.*live teacher.*accept the cache: .*fkl"):
        distill(cfg_for(run, loss="test_dense_only", teacher_cache=str(cache_dir)), data)
    HiddenLoss.name = "test_hidden"
    with pytest.raises(ConfigError, match="needs the teacher's hidden states"):
        distill(cfg_for(run, loss="test_hidden", teacher_cache=str(cache_dir)), data)
    with pytest.raises(ConfigError, match="temperature"):   # cache at tau=2, training at tau=1
        distill(cfg_for(run, loss="fkl", temperature=1.0, teacher_cache=str(cache_dir), distill_steps=1), data)


# --- evaluation -----------------------------------------------------------------------------------

def test_periodic_evaluation_loss_kl_bleu_rouge(models, data, tmp_path):
    from pesc.data.examples import build_examples
    from pesc.metrics.kl import teacher_student_kl
    from pesc.models import load_model, load_tokenizer
    from pesc.training.stages import distill

    run = new_run(models, tmp_path / "run")
    r = distill(cfg_for(run, eval_steps=2, eval_examples=4, eval_generate_dialogues=1, eval_dialogues=1,
                        max_new_tokens=6, gen_batch_size=8, alpha=1.0, lr=1e-2), data)
    logs = [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines()]
    evals = [x for x in logs if "eval_loss" in x]
    assert [x["step"] for x in evals] == [2, 4]
    for x in evals:
        assert {"eval_ce_loss", "eval_distill_loss", "eval_kl", "eval_bleu4", "eval_rougeL"} <= set(x)
        assert x["eval_kl"] > 0 and 0 <= x["eval_bleu4"] <= 1 and 0 <= x["eval_rougeL"] <= 1
    ev = r["eval"]
    assert ev["examples"] == 4 and ev["dialogues"] == 1 and ev["turns"] == 3
    assert {"kl", "bleu4", "rougeL"} <= set(ev["before"]) and {"kl", "bleu4", "rougeL"} <= set(ev["after"])
    assert ev["after"]["kl"] < ev["before"]["kl"]
    # the reported KL is the scorer's KL of the saved student
    tok = load_tokenizer(str(run / "student"))
    held = build_examples(data.heldout, tok, 256)[:4]
    kl = teacher_student_kl(load_model(str(run / "teacher-init")), load_model(str(run / "student")), held,
                            tok.pad_token_id, vocab_size=len(tok), progress=False)
    assert kl.per_token_mean == pytest.approx(ev["after"]["kl"], rel=1e-4)
    assert evals[-1]["eval_kl"] == pytest.approx(ev["after"]["kl"], rel=1e-4)
    saved = json.loads((run / "student" / "results.json").read_text())
    assert saved["eval"]["after"]["kl"] == ev["after"]["kl"] and saved["loss"] == "fkl"
    assert (run / "config.yaml").exists() and (run / "student" / "config.yaml").exists()


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_help_and_one_line_errors(capsys, tmp_path, models, data):
    from pesc.cli import main

    for cmd in ("train-teacher", "cache-teacher", "distill", "sweep", "push"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--teacher-cache" in out and "top-k" in out and "--repo-id" in out and "FKL baseline" in out
    assert main(["distill", "--out", str(tmp_path / "x"), "--set", "no_such_option=1"]) == 2
    assert main(["distill", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert main(["sweep", "--losses", "fkl,not_a_loss", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "unknown config option(s): no_such_option" in err and "not a directory" in err
    assert "unknown loss 'not_a_loss'" in err and "Traceback" not in err
    # cache-teacher before the teacher exists (teacher_steps > 0): says which command to run first
    from pesc.training.stages import cache_teacher

    with pytest.raises(ConfigError, match="pesc train-teacher"):
        cache_teacher(cfg_for(new_run(models, tmp_path / "r"), teacher_steps=5), data, progress=False)

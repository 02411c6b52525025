"""Teacher-student KL against a direct per-example computation on tiny random Llama models."""

import math

import pytest
import torch

from pesc.data.examples import IGNORE_INDEX, Example
from pesc.errors import ConfigError
from pesc.metrics.kl import KLResult, relative_change, teacher_student_kl
from pesc.models.smoke import tiny_model

V = 50
PAD = 0


def _examples(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        p_len = int(torch.randint(3, 12, (1,), generator=g))
        t_len = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(1, V, (p_len + t_len,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * p_len + ids[p_len:], f"d{k}", 1))
    return out


def _direct(teacher, student, examples, tau, vocab=None):
    """One example at a time, no padding, full logits: sum_v p (log p - log q) per target position."""
    per_example, all_tokens = [], []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            zt, zs = teacher(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
            if vocab is not None:
                zt, zs = zt[:, :vocab], zs[:, :vocab]
            pos = [t for t in range(len(e.labels) - 1) if e.labels[t + 1] != IGNORE_INDEX]
            kls = []
            for t in pos:
                p = torch.softmax(zt[t].double() / tau, -1)
                q = torch.softmax(zs[t].double() / tau, -1)
                kls.append(float((p * (p.log() - q.log())).sum()))
            per_example.append(sum(kls))
            all_tokens += kls
    return sum(all_tokens) / len(all_tokens), sum(per_example) / len(per_example), len(all_tokens)


@pytest.fixture(scope="module")
def models():
    return tiny_model(V, layers=2, hidden=32, seed=1).eval(), tiny_model(V, layers=1, hidden=32, seed=2).eval()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_matches_direct_computation(models, tau):
    teacher, student = models
    ex = _examples()
    res = teacher_student_kl(teacher, student, ex, pad_id=PAD, temperature=tau, batch_size=3, progress=False)
    tok, per_ex, n = _direct(teacher, student, ex, tau)
    assert res.n_tokens == n == sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in ex)
    assert res.n_examples == len(ex) and res.temperature == tau
    assert res.per_token_mean == pytest.approx(tok, rel=1e-5)
    assert res.per_example_sum_mean == pytest.approx(per_ex, rel=1e-5)
    # the per-example convention is the per-token one times the mean target length
    assert res.per_example_sum_mean != pytest.approx(res.per_token_mean)
    # batch size, chunking and ordering do not change the number
    res1 = teacher_student_kl(teacher, student, ex, PAD, tau, batch_size=1, progress=False, memory_budget_mb=0)
    assert res1.per_token_mean == pytest.approx(res.per_token_mean, rel=1e-5)


def test_identical_models_give_zero(models):
    teacher, _ = models
    res = teacher_student_kl(teacher, teacher, _examples(), PAD, progress=False)
    assert abs(res.per_token_mean) < 1e-6 and abs(res.per_example_sum_mean) < 1e-5


def test_padded_student_vocab_is_sliced_and_mismatch_refused(models):
    teacher, _ = models
    wide = tiny_model(V + 14, layers=1, hidden=32, seed=3).eval()  # logits padded beyond the tokenizer
    ex = _examples(seed=4)
    with pytest.raises(ConfigError, match="widths differ"):
        teacher_student_kl(teacher, wide, ex, PAD, progress=False)
    res = teacher_student_kl(teacher, wide, ex, PAD, vocab_size=V, progress=False)
    tok, per_ex, _ = _direct(teacher, wide, ex, 1.0, vocab=V)
    assert res.per_token_mean == pytest.approx(tok, rel=1e-5)
    assert res.per_example_sum_mean == pytest.approx(per_ex, rel=1e-5)


def test_training_mode_restored_and_errors(models):
    teacher, student = models
    student.train()
    teacher_student_kl(teacher, student, _examples(n=2), PAD, progress=False)
    assert student.training and not teacher.training
    student.eval()
    with pytest.raises(ConfigError, match="no target tokens"):
        teacher_student_kl(teacher, student, [Example([1, 2, 3], [IGNORE_INDEX] * 3, "x", 1)], PAD, progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        teacher_student_kl(teacher, student, _examples(n=1), PAD, temperature=0, progress=False)


def test_relative_change():
    before = KLResult(2.0, 20.0, 100, 10, 1.0)
    after = KLResult(1.5, 16.0, 100, 10, 1.0)
    ch = relative_change(before, after)
    assert ch["per_token_mean"] == pytest.approx(-0.25) and ch["per_example_sum_mean"] == pytest.approx(-0.2)
    with pytest.raises(ConfigError):
        relative_change(before, KLResult(1.0, 1.0, 1, 1, 2.0))
    assert math.isnan(relative_change(KLResult(0.0, 0.0, 1, 1, 1.0), after)["per_token_mean"])
    assert "tau=1" in str(after)

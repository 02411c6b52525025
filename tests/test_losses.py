"""Distillation losses: registry and parameters, references for the per-position losses, properties
(zero at equality, masking, robustness) and gradient checks for every registered loss.

OT-specific references (POT) live in test_losses_ot.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from pesc.errors import ConfigError
from pesc.losses import (TeacherSignal, available_losses, build_loss, loss_help, parse_loss_args, rest_logmass,
                         shift_for_distillation)

FULL_VOCAB = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "l1", "l2"]
ALL = FULL_VOCAB + ["w1_cdf", "sorted_w1", "sinkhorn", "hybrid", "layer_emd"]
OT_PARAMS = {"topk": 4, "iters": 200}
M_LAYERS, N_LAYERS, DS, DT = 2, 3, 6, 10


def logits(B, T, V, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)


class Case:
    """A built loss with everything it needs (embeddings, hidden states): case(s, t, mask)."""

    def __init__(self, name, V, B, T, dtype=torch.float64, seed=0, temperature=1.0, **params):
        g = torch.Generator().manual_seed(seed + 100)
        if name in ("sinkhorn", "hybrid"):
            params = {**OT_PARAMS, **params}
        self.loss = build_loss(name, temperature=temperature, **params)
        self.Es = torch.randn(V, 5, generator=g, dtype=torch.float64).to(dtype)
        self.Et = torch.randn(V, 7, generator=g, dtype=torch.float64).to(dtype)
        self.hs = tuple(torch.randn(B, T + 1, DS, generator=g, dtype=torch.float64).to(dtype)
                        for _ in range(M_LAYERS + 1))
        self.ht = tuple((torch.randn(B, T + 1, DT, generator=g, dtype=torch.float64) * (1 + i)).to(dtype)
                        for i in range(N_LAYERS + 1))
        self.loss.prepare(student_embeddings=self.Es, teacher_embeddings=self.Et, student_hidden_size=DS,
                          teacher_hidden_size=DT, student_layers=M_LAYERS, teacher_layers=N_LAYERS)
        if name == "layer_emd":
            self.loss.eval()  # layer weights stay fixed between the calls a test compares
        if dtype == torch.float64:
            self.loss.double()

    def teacher(self, t):
        return TeacherSignal(logits=t, hidden_states=self.ht)

    def __call__(self, s, t, mask, teacher=None, hs=None, **kw):
        return self.loss(s, teacher if teacher is not None else self.teacher(t), mask,
                         student_embeddings=self.Es, teacher_embeddings=self.Et,
                         student_hidden=hs if hs is not None else self.hs, **kw)


# ---------------------------------------------------------------------------------------------
# registry and parameters
# ---------------------------------------------------------------------------------------------


def test_registry_lists_every_loss_and_builds_each_with_defaults():
    assert sorted(ALL) == available_losses()
    for name in ALL:
        loss = build_loss(name, temperature=2.0, vocab_size=100)
        assert loss.name == name and loss.temperature == 2.0
        assert f"{name}:" in loss_help(name)


def test_parse_loss_args_types_values_and_rejects_unknown_keys():
    kw = parse_loss_args(["--loss.cost=euclidean", "topk=100", "epsilon=0.1", "debias=true", "tol=none",
                          "memory-mb=64"], loss="sinkhorn")
    assert kw == {"cost": "euclidean", "topk": 100, "epsilon": 0.1, "debias": True, "tol": None, "memory_mb": 64.0}
    assert type(kw["topk"]) is int and type(kw["memory_mb"]) is float
    assert parse_loss_args([("beta", "0.25")], loss="jsd") == {"beta": 0.25}
    assert parse_loss_args({"weight": 0.3, "topk": 8}, loss="hybrid") == {"weight": 0.3, "topk": 8}
    assert parse_loss_args(["a=1", "b=x", "c=2.5", "d=false"]) == {"a": 1, "b": "x", "c": 2.5, "d": False}
    with pytest.raises(ConfigError, match="no parameter 'topkk'.*topk"):
        parse_loss_args(["topkk=3"], loss="sinkhorn")
    with pytest.raises(ConfigError, match="cost=.*one of cosine, euclidean"):
        parse_loss_args(["cost=manhattan"], loss="sinkhorn")
    with pytest.raises(ConfigError, match="integer"):
        parse_loss_args(["topk=ten"], loss="sinkhorn")
    with pytest.raises(ConfigError, match="key=value"):
        parse_loss_args(["topk"], loss="sinkhorn")
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss("kl_div")
    with pytest.raises(ConfigError, match="no parameter"):
        build_loss("fkl", beta=0.5)
    with pytest.raises(ConfigError, match="beta"):
        build_loss("jsd", beta=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        build_loss("fkl", temperature=0.0)


def test_shift_for_distillation_shapes():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert shift_for_distillation(labels).tolist() == [[False, True, True, False]]
    assert shift_for_distillation(labels, logits_len=5).tolist() == [[False, True, True, False, False]]


# ---------------------------------------------------------------------------------------------
# references: loops over positions in float64
# ---------------------------------------------------------------------------------------------


def _ref_row(name, p, q, beta=0.5, lam=0.1):
    kl = lambda x, y: (x * (x.log() - y.log())).sum()  # noqa: E731
    return {
        "fkl": lambda: kl(p, q), "rkl": lambda: kl(q, p),
        "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
        "skl": lambda: kl(p, lam * p + (1 - lam) * q), "srkl": lambda: kl(q, lam * q + (1 - lam) * p),
        "tvd": lambda: 0.5 * (p - q).abs().sum(), "l1": lambda: (q - p).abs().sum(),
        "l2": lambda: (q - p).square().sum().sqrt(),
    }[name]()


@pytest.mark.parametrize("name", FULL_VOCAB)
def test_full_vocabulary_divergences_match_a_loop_over_positions(name):
    B, T, V, tau = 2, 4, 17, 1.7
    s = logits(B, T, V, 1).requires_grad_()
    t = logits(B, T, V, 2)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    out = build_loss(name, temperature=tau)(s, TeacherSignal(logits=t), mask, num_items=7)
    scale = tau ** 2 if name in ("fkl", "rkl", "jsd", "skl", "srkl") else 1.0
    ref = sum(_ref_row(name, torch.softmax(t[b, i] / tau, -1), torch.softmax(s[b, i] / tau, -1))
              for b in range(B) for i in range(T) if mask[b, i]) * scale / 7
    assert out.value.item() == pytest.approx(ref.item(), rel=1e-10)
    assert out.parts[name] == pytest.approx(ref.item(), rel=1e-10)
    g, = torch.autograd.grad(out.value, s)
    gr, = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_divergences_from_a_topk_cache_use_k_plus_one_buckets(name):
    B, T, V, k = 1, 3, 15, 4
    s = logits(B, T, V, 3).requires_grad_()
    t = logits(B, T, V, 4)
    mask = torch.ones(B, T, dtype=torch.bool)
    sig = TeacherSignal.topk_from_logits(t, k)
    out = build_loss(name)(s, sig, mask)
    ref = 0
    for i in range(T):
        p, q = torch.softmax(t[0, i], -1), torch.softmax(s[0, i], -1)
        ids = p.topk(k).indices
        rest = torch.ones(V, dtype=torch.bool)
        rest[ids] = False
        pb = torch.cat([p[ids], p[rest].sum()[None]])
        qb = torch.cat([q[ids], q[rest].sum()[None]])
        ref = ref + _ref_row(name, pb, qb)
    ref = ref / T
    assert out.value.item() == pytest.approx(ref.item(), rel=1e-9)
    g, = torch.autograd.grad(out.value, s)
    gr, = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-12)
    # a lower bound of the full divergence (data processing), equal when k covers the vocabulary
    full = build_loss(name)(s, TeacherSignal(logits=t), mask).value
    assert out.value.item() <= full.item() + 1e-12
    whole = build_loss(name)(s, TeacherSignal.topk_from_logits(t, V), mask).value
    assert whole.item() == pytest.approx(full.item(), rel=1e-9)


def test_cache_temperature_mismatch_and_losses_without_cache_support_refuse():
    s, t = logits(1, 2, 9), logits(1, 2, 9, 1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    sig = TeacherSignal.topk_from_logits(t, 3, temperature=1.0)
    with pytest.raises(ConfigError, match="temperature 1 but loss 'fkl' uses temperature 2"):
        build_loss("fkl", temperature=2.0)(s, sig, mask)
    for name in ["l2", "w1_cdf", "sorted_w1", "layer_emd"]:
        with pytest.raises(ConfigError, match="cannot run from a top-k teacher cache"):
            build_loss(name)(s, sig, mask)
    assert build_loss("sorted_w1", topk=3).supports_sparse_teacher
    assert build_loss("sorted_w1", topk=3)(s, sig, mask).value.item() > 0
    torch.testing.assert_close(rest_logmass(sig.topk_logprobs), sig.rest_logmass)
    p = torch.softmax(t, -1)
    torch.testing.assert_close(sig.rest_logmass.exp(), 1 - p.topk(3).values.sum(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unit", ["id", "vocab"])
def test_w1_cdf_matches_scipy_wasserstein_distance(unit):
    B, T, V, tau = 2, 3, 23, 1.3
    s = logits(B, T, V, 5).requires_grad_()
    t = logits(B, T, V, 6)
    mask = torch.ones(B, T, dtype=torch.bool)
    out = build_loss("w1_cdf", temperature=tau, unit=unit)(s, TeacherSignal(logits=t), mask)
    p = torch.softmax(t / tau, -1).reshape(-1, V).numpy()
    q = torch.softmax(s.detach() / tau, -1).reshape(-1, V).numpy()
    ids = np.arange(V)
    ref = np.mean([wasserstein_distance(ids, ids, p[r], q[r]) for r in range(len(p))])
    if unit == "vocab":
        ref /= V - 1
    assert out.value.item() == pytest.approx(ref, rel=1e-9)


def test_w1_cdf_index_variant_float32_and_gradient_match_loops():
    B, T, V = 1, 3, 19
    s = logits(B, T, V, 7).requires_grad_()
    t = logits(B, T, V, 8)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss = build_loss("w1_cdf", weighting="index", unit="id")
    out = loss(s, TeacherSignal(logits=t), mask)
    ref = 0
    for i in range(T):
        Fp, Fq = torch.softmax(t[0, i], -1).cumsum(0), torch.softmax(s[0, i], -1).cumsum(0)
        ref = ref + sum(j / V * (Fp[j] - Fq[j]).abs() for j in range(V - 1))
    ref = ref / T
    assert out.value.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(out.value, s)[0], torch.autograd.grad(ref, s)[0])
    # float32 input, float32 and float64 cumulative sums agree with the float64 value
    for cd in ["float32", "float64"]:
        v32 = build_loss("w1_cdf", weighting="index", unit="id", cumsum_dtype=cd)(
            s.detach().float(), TeacherSignal(logits=t.float()), mask).value
        assert v32.dtype == torch.float32 and v32.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="cumsum_dtype.*float32, float64"):
        build_loss("w1_cdf", cumsum_dtype="bfloat16")


def test_sorted_w1_across_tokenizers_and_its_topk_bound():
    B, T, Vs, Vt = 1, 3, 11, 16
    s = logits(B, T, Vs, 9).requires_grad_()
    t = logits(B, T, Vt, 10)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss = build_loss("sorted_w1")
    assert loss.cross_tokenizer
    out = loss(s, TeacherSignal(logits=t), mask)
    ref = 0
    for i in range(T):
        p = torch.softmax(t[0, i], -1).sort(descending=True).values
        q = torch.softmax(s[0, i], -1).sort(descending=True).values
        ref = ref + (torch.cat([q, q.new_zeros(Vt - Vs)]) - p).abs().sum()
    ref = ref / T
    assert out.value.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(out.value, s)[0], torch.autograd.grad(ref, s)[0])
    top = build_loss("sorted_w1", topk=4)(s, TeacherSignal(logits=t), mask).value
    assert 0 < top.item() <= out.value.item() + 1e-12
    # the divergences need one vocabulary and say so
    with pytest.raises(ConfigError, match="differ.*vocab_size.*sorted_w1"):
        build_loss("fkl")(s, TeacherSignal(logits=t), mask)


def test_vocab_padding_is_sliced_and_a_short_width_is_refused():
    B, T, V = 1, 3, 12
    s, t = logits(B, T, V, 11), logits(B, T, V, 12)
    mask = torch.ones(B, T, dtype=torch.bool)
    ref = build_loss("fkl")(s, TeacherSignal(logits=t), mask).value
    s_pad = torch.cat([s, torch.full((B, T, 4), 3.0, dtype=s.dtype)], -1).requires_grad_()
    t_pad = torch.cat([t, torch.full((B, T, 2), 9.0, dtype=t.dtype)], -1)
    out = build_loss("fkl", vocab_size=V)(s_pad, TeacherSignal(logits=t_pad), mask)
    assert out.value.item() == pytest.approx(ref.item(), rel=1e-12)
    g, = torch.autograd.grad(out.value, s_pad)
    assert g.shape == s_pad.shape and torch.all(g[..., V:] == 0)
    with pytest.raises(ConfigError, match="smaller than the tokenizer length"):
        build_loss("fkl", vocab_size=V + 3)(s_pad[..., :V + 1], TeacherSignal(logits=t_pad), mask)


def test_sum_over_tokens_divided_by_num_items_not_by_length():
    s, t = logits(2, 5, 10, 13), logits(2, 5, 10, 14)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :4] = True
    loss = build_loss("fkl")
    mean = loss(s, TeacherSignal(logits=t), mask).value
    total = loss(s, TeacherSignal(logits=t), mask, num_items=12).value
    assert total.item() == pytest.approx(mean.item() * 6 / 12, rel=1e-12)
    with pytest.raises(ValueError, match="num_items"):
        loss(s, TeacherSignal(logits=t), mask, num_items=0)


# ---------------------------------------------------------------------------------------------
# properties, for every loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_zero_at_equality_and_positive_otherwise(name):
    B, T, V = 1, 3, 10
    params = {}
    if name in ("sinkhorn", "hybrid"):
        # the Sinkhorn divergence is 0 at equality when both sides live in the same space
        params = {"debias": True, "points": "student", "iters": 500}
    if name == "layer_emd":
        params = {"logit_loss": "fkl"}
    case = Case(name, V, B, T, **params)
    s = logits(B, T, V, 15)
    mask = torch.ones(B, T, dtype=torch.bool)
    if name == "layer_emd":   # teacher = student: same hidden states and width, identity projection
        case.ht = case.hs
        case.loss = build_loss("layer_emd").prepare(student_hidden_size=DS, teacher_hidden_size=DS,
                                                    student_layers=M_LAYERS, teacher_layers=M_LAYERS).double().eval()
    same = case(s, s.clone(), mask).value.item()
    assert abs(same) < 1e-7, same
    other = case(s, logits(B, T, V, 16), mask).value.item()
    assert other > 1e-4, other


@pytest.mark.parametrize("name", ALL)
def test_masked_positions_do_not_change_the_value_and_get_no_gradient(name):
    B, T, V = 2, 3, 10
    case = Case(name, V, B, T)
    s, t = logits(B, T, V, 17), logits(B, T, V, 18)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 50 * torch.randn_like(s2[~mask])
    t2[~mask] = -3.0
    s2.requires_grad_()
    a = case(s, t, mask).value
    b = case(s2, t2, mask).value
    assert a.item() == pytest.approx(b.item(), rel=1e-9, abs=1e-12)
    g, = torch.autograd.grad(b, s2)
    assert torch.all(g[~mask] == 0) and g[mask].abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_no_nan_or_inf_with_minus_inf_logits_bfloat16_temperatures_and_ties(name):
    B, T, V = 1, 4, 12
    mask = torch.ones(B, T, dtype=torch.bool)
    s, t = logits(B, T, V, 19, torch.float32), logits(B, T, V, 20, torch.float32)
    s[0, 0, :3] = -math.inf            # tokens ruled out by both models
    t[0, 0, :3] = -math.inf
    s[0, 1, 5] = -math.inf             # a token only the student rules out
    s[0, 2, :] = 1.0                   # a position whose top-k is all ties
    t[0, 3, :] = 0.5
    for tau in (0.5, 1.0, 2.0, 4.0):
        for dtype in (torch.float32, torch.bfloat16):
            case = Case(name, V, B, T, dtype=torch.float32, temperature=tau)
            x = s.detach().to(dtype).clone().requires_grad_()
            out = case(x, t.to(dtype), mask)
            assert torch.isfinite(out.value), (tau, dtype, out.value)
            assert all(math.isfinite(v) for v in out.parts.values())
            out.value.backward()
            assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all(), (tau, dtype)


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_and_placeholder_logits_raise(name):
    case = Case(name, 8, 1, 3)
    s, t = logits(1, 3, 8, 21), logits(1, 3, 8, 22)
    with pytest.raises(ValueError, match="empty mask"):
        case(s, t, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="placeholder|batch, length, vocab"):
        case(s[..., :0], t, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        case(s, t, torch.ones(1, 2, dtype=torch.bool))


# The OT losses' gradients are exact for the entropic value with envelope gradients (at convergence)
# and for any value with autodiff; the default linear value + envelope is the first-order shortcut
# that POT's sinkhorn2 reference is compared against in test_losses_ot.py.
GRADCHECK_CASES = [(n, {}) for n in ALL if n not in ("sinkhorn", "hybrid")] + [
    (n, p) for n in ("sinkhorn", "hybrid")
    for p in ({"iters": 400, "value": "entropic"}, {"iters": 60, "value": "linear", "grad": "autodiff"})]


@pytest.mark.parametrize("name,params", GRADCHECK_CASES, ids=[f"{n}-{'-'.join(map(str, p.values()))}".rstrip("-")
                                                             for n, p in GRADCHECK_CASES])
def test_gradcheck_float64(name, params):
    B, T, V = 1, 3, 8
    case = Case(name, V, B, T, temperature=1.5, **params)
    s = logits(B, T, V, 23).requires_grad_()
    t = logits(B, T, V, 24)
    mask = torch.tensor([[True, False, True]])
    assert torch.autograd.gradcheck(lambda x: case(x, t, mask).value, (s,), eps=1e-6, atol=1e-6)
    if name == "layer_emd":
        h = case.hs[1].clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: case(s.detach(), t, mask, hs=(case.hs[0], x) + case.hs[2:]).value, (h,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# with real (tiny, random) transformer models, called the way the distillation trainer calls
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    from pesc.models.smoke import tiny_model

    teacher = tiny_model(vocab_size=48, layers=3, hidden=32, seed=1).eval()
    student = tiny_model(vocab_size=48, layers=2, hidden=16, seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 48, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100          # prompt tokens are never targets
    labels[1, :6] = -100
    return teacher, student, ids, labels


@pytest.mark.parametrize("name", ALL)
def test_every_loss_trains_a_tiny_transformer_student(name, tiny_models):
    teacher, student, ids, labels = tiny_models
    student.zero_grad()
    params = {"topk": 5} if name in ("sinkhorn", "hybrid") else {}
    loss = build_loss(name, temperature=2.0, vocab_size=48, **params)
    s_emb, t_emb = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    loss.prepare(student_embeddings=s_emb, teacher_embeddings=t_emb, student_hidden_size=16, teacher_hidden_size=32,
                 student_layers=2, teacher_layers=3)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True)
    s_out = student(input_ids=ids, output_hidden_states=True)
    mask = shift_for_distillation(labels)
    out = loss(s_out.logits[:, :-1], TeacherSignal(logits=t_out.logits[:, :-1], hidden_states=t_out.hidden_states),
               mask, num_items=int(mask.sum()), student_hidden=s_out.hidden_states, student_embeddings=s_emb,
               teacher_embeddings=t_emb)
    assert torch.isfinite(out.value) and out.value.item() > 0 and name in out.parts
    out.value.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    for p in loss.parameters():          # the loss's own parameters (projections) learn too
        assert p.grad is not None and float(p.grad.abs().sum()) > 0

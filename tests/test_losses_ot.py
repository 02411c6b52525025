"""Optimal-transport losses against POT: the batched Sinkhorn core, the top-k `sinkhorn` loss (built
position by position with ot.sinkhorn2), `hybrid`, and `layer_emd` (ot.emd2 on a loop-built cost)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from pesc.errors import ConfigError
from pesc.losses import TeacherSignal, build_loss
from pesc.losses.ot import entropic_ot, pairwise_cost, sinkhorn, sinkhorn_divergence

D64 = torch.float64


def _rand_problem(N, n, m, seed, zero_mass=False):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(N, n, m, generator=g, dtype=D64)
    a = torch.rand(N, n, generator=g, dtype=D64)
    b = torch.rand(N, m, generator=g, dtype=D64)
    if zero_mass:
        a[:, 0] = 0.0      # padding / duplicate support points carry no mass
        b[:, -1] = 0.0
    return C, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def _rel(x, y):
    x, y = x.detach(), y.detach()
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-300))


@pytest.mark.parametrize("method,pot_method,eps", [("scaling", "sinkhorn", 0.1), ("log", "sinkhorn_log", 0.02)])
def test_batched_sinkhorn_matches_pot_sinkhorn2_values_and_gradients(method, pot_method, eps):
    """Same epsilon, same iterations (no early stop): <T, C> and its gradients through the iterations."""
    N, n, m, iters = 4, 7, 5, 30
    C, a, b = _rand_problem(N, n, m, 0)
    C, a, b = (x.clone().requires_grad_() for x in (C, a, b))
    v, err = entropic_ot(C, a, b, eps, n_iters=iters, value="linear", grad="autodiff", method=method)
    ref = torch.stack([ot.sinkhorn2(a[i], b[i], C[i], eps, method=pot_method, numItermax=iters, stopThr=0.0)
                       for i in range(N)])
    assert _rel(v, ref) < 1e-10
    for x, y in zip(torch.autograd.grad(v.sum(), (C, a, b)), torch.autograd.grad(ref.sum(), (C, a, b))):
        assert _rel(x, y) < 1e-10
    # the no-grad envelope path computes the very same plan and value
    v2, _ = entropic_ot(C, a, b, eps, n_iters=iters, value="linear", grad="envelope", method=method)
    assert _rel(v2, ref) < 1e-10


@pytest.mark.parametrize("method", ["scaling", "log"])
def test_envelope_gradients_equal_converged_autodiff_of_pot(method):
    """Dual potentials give the gradient of W_eps = <T,C> + eps KL(T | ab^T) (envelope theorem)."""
    N, n, m, eps = 3, 6, 4, 0.05
    C, a, b = _rand_problem(N, n, m, 1)
    C, a, b = (x.clone().requires_grad_() for x in (C, a, b))
    v, err = entropic_ot(C, a, b, eps, n_iters=3000, value="entropic", grad="envelope", method=method)
    assert float(err.max()) < 1e-12
    ref = []
    for i in range(N):
        T = ot.sinkhorn(a[i], b[i], C[i], eps, method="sinkhorn_log", numItermax=3000, stopThr=1e-14)
        keep = T > 0
        Tk, ab = T[keep], (a[i][:, None] * b[i][None, :])[keep]
        kl = (Tk * torch.log(Tk / ab)).sum()
        ref.append((T * C[i]).sum() + eps * kl)
    ref = torch.stack(ref)
    assert _rel(v, ref) < 1e-9
    gv, gr = torch.autograd.grad(v.sum(), (C, a, b)), torch.autograd.grad(ref.sum(), (C, a, b))
    assert _rel(gv[0], gr[0]) < 1e-6
    for x, y in ((gv[1], gr[1]), (gv[2], gr[2])):
        # on the simplex a gradient is defined up to a constant: compare the centred gradients
        assert _rel(x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)) < 1e-6
    # zero masses (padding): POT's log-domain gradient is NaN there, ours stays finite
    C0, a0, b0 = (x.clone().requires_grad_() for x in _rand_problem(N, n, m, 1, zero_mass=True))
    v0, _ = entropic_ot(C0, a0, b0, eps, n_iters=200, value="entropic", grad="envelope", method=method)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(v0.sum(), (C0, a0, b0)))


def test_solver_tolerance_stops_early_and_log_domain_survives_tiny_epsilon():
    C, a, b = _rand_problem(2, 6, 6, 2)
    res = sinkhorn(C, a, b, 0.1, n_iters=5000, tol=1e-10)
    assert res.n_iters < 5000 and res.method == "scaling"
    T = res.plan(C)
    assert float((T.sum(1) - b).abs().sum(-1).max()) < 1e-10
    torch.testing.assert_close(T.sum(2), a)
    # epsilon far below the cost range: the log domain is chosen and stays finite in float32
    res = sinkhorn(C.float(), a.float(), b.float(), 1e-3, n_iters=200)
    assert res.method == "log" and torch.isfinite(res.f).all() and torch.isfinite(res.plan(C.float())).all()
    # and it agrees with POT's exact EMD as epsilon -> 0
    v, _ = entropic_ot(C, a, b, 1e-3, n_iters=20000, value="linear", method="log")
    exact = torch.tensor([ot.emd2(a[i].numpy(), b[i].numpy(), C[i].numpy()) for i in range(2)], dtype=D64)
    assert _rel(v, exact) < 1e-2


def test_sinkhorn_divergence_is_zero_on_equal_measures_and_matches_pot():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=g, dtype=D64)
    y = torch.randn(2, 5, 3, generator=g, dtype=D64)
    a = torch.softmax(torch.randn(2, 5, generator=g, dtype=D64), -1)
    b = torch.softmax(torch.randn(2, 5, generator=g, dtype=D64), -1)
    cost = lambda u, w: pairwise_cost(u, w, "euclidean")  # noqa: E731
    same, _ = sinkhorn_divergence(cost(x, x), cost(x, x), cost(x, x), a, a, 0.1, n_iters=500)
    assert float(same.abs().max()) < 1e-12
    sd, _ = sinkhorn_divergence(cost(x, y), cost(x, x), cost(y, y), a, b, 0.1, n_iters=500, value="linear")
    ref = [ot.sinkhorn2(a[i], b[i], cost(x, y)[i], 0.1, numItermax=500, stopThr=0)
           - 0.5 * (ot.sinkhorn2(a[i], a[i], cost(x, x)[i], 0.1, numItermax=500, stopThr=0)
                    + ot.sinkhorn2(b[i], b[i], cost(y, y)[i], 0.1, numItermax=500, stopThr=0)) for i in range(2)]
    assert _rel(sd, torch.stack(ref)) < 1e-9
    assert float(sd.min()) > 0


# ---------------------------------------------------------------------------------------------
# the sinkhorn loss, position by position with POT
# ---------------------------------------------------------------------------------------------


def _setup(B=2, T=3, V=14, seed=4):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=D64) * 2).requires_grad_()
    t = torch.randn(B, T, V, generator=g, dtype=D64) * 2
    Es = torch.randn(V, 5, generator=g, dtype=D64)
    Et = torch.randn(V, 8, generator=g, dtype=D64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    return s, t, Es, Et, mask


def _reference(s, t, mask, Es, Et, P, *, k, tau, support, masses, cost, eps, iters, debias=False):
    """Loop over positions: support, masses and costs built by hand, OT by ot.sinkhorn2 (torch)."""
    total = 0
    for b, i in mask.nonzero().tolist():
        zs, zt = s[b, i] / tau, t[b, i] / tau
        q, p = torch.softmax(zs, -1), torch.softmax(zt, -1)
        top_s, top_t = zs.detach().topk(k).indices.tolist(), zt.topk(k).indices.tolist()
        ids = {"union": sorted(set(top_s) | set(top_t)), "student": top_s, "teacher": top_t}[support]
        ids = torch.tensor(ids)
        x, y = Es[ids], Et[ids] @ P.t()
        if cost == "euclidean":
            C = ot.dist(x, y, metric="sqeuclidean") / x.shape[1]
        else:
            C = 1 - (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).t()
        scale = C.detach().max()
        costs = {"xy": C / scale}
        if debias:
            costs["xx"] = ot.dist(x, x, metric="sqeuclidean") / x.shape[1] / scale
            costs["yy"] = ot.dist(y, y, metric="sqeuclidean") / x.shape[1] / scale
        a, bb = q[ids], p[ids]
        if masses == "renormalize":
            a, bb = a / a.sum(), bb / bb.sum()
        else:
            a, bb = torch.cat([a, (1 - a.sum())[None]]), torch.cat([bb, (1 - bb.sum())[None]])
            for key, M in costs.items():
                rc = costs["xy"].detach().max()
                n = M.shape[0]
                Mr = torch.zeros(n + 1, n + 1, dtype=D64)
                Mr[:n, :n] = M
                Mr[n, :n] = rc
                Mr[:n, n] = rc
                costs[key] = Mr
        w = lambda u, v, M: ot.sinkhorn2(u, v, M, eps, numItermax=iters, stopThr=0.0)  # noqa: E731
        val = w(a, bb, costs["xy"])
        if debias:
            val = val - 0.5 * (w(a, a, costs["xx"]) + w(bb, bb, costs["yy"]))
        total = total + val
    return total / int(mask.sum())


@pytest.mark.parametrize("support,masses,cost,debias", [
    ("union", "renormalize", "euclidean", False),
    ("union", "rest", "cosine", False),
    ("student", "renormalize", "cosine", False),
    ("teacher", "rest", "euclidean", False),
    ("union", "renormalize", "euclidean", True),
])
def test_sinkhorn_loss_matches_pot_position_by_position(support, masses, cost, debias):
    s, t, Es, Et, mask = _setup()
    params = dict(k=4, tau=1.5, support=support, masses=masses, cost=cost, eps=0.1, iters=40)
    loss = build_loss("sinkhorn", temperature=1.5, topk=4, support=support, masses=masses, cost=cost,
                      epsilon=0.1, iters=40, value="linear", grad="autodiff", debias=debias).double()
    loss.prepare(student_embeddings=Es, teacher_embeddings=Et)
    P = loss.projection.weight
    out = loss(s, TeacherSignal(logits=t), mask, student_embeddings=Es, teacher_embeddings=Et)
    ref = _reference(s, t, mask, Es, Et, P, debias=debias, **params)
    assert out.value.item() == pytest.approx(ref.item(), rel=1e-9)
    got = torch.autograd.grad(out.value, (s, P))
    want = torch.autograd.grad(ref, (s, P))
    assert _rel(got[0], want[0]) < 1e-8 and _rel(got[1], want[1]) < 1e-8
    # the default envelope path computes the same linear value (parts) from the same plans
    env = build_loss("sinkhorn", temperature=1.5, topk=4, support=support, masses=masses, cost=cost,
                     epsilon=0.1, iters=40, value="linear", debias=debias).double()
    env.projection = loss.projection
    out2 = env(s, TeacherSignal(logits=t), mask, student_embeddings=Es, teacher_embeddings=Et)
    assert out2.value.item() == pytest.approx(ref.item(), rel=1e-9)
    if not debias:
        assert out2.parts["ot_linear"] == pytest.approx(ref.item(), rel=1e-9)


def test_sinkhorn_envelope_gradients_match_autodiff_at_convergence_for_logits_projection_embeddings():
    """For the entropic value the dual potentials are its exact gradient at convergence."""
    s, t, Es, Et, mask = _setup(seed=5)
    Es = Es.clone().requires_grad_()
    grads = {}
    for grad in ["envelope", "autodiff"]:
        loss = build_loss("sinkhorn", topk=4, iters=1500, grad=grad, debias=True, masses="rest",
                          embedding_grad=True, value="entropic").double()
        torch.manual_seed(0)
        loss.prepare(student_embeddings=Es, teacher_embeddings=Et)
        v = loss(s, TeacherSignal(logits=t), mask, student_embeddings=Es, teacher_embeddings=Et).value
        grads[grad] = (v,) + torch.autograd.grad(v, (s, loss.projection.weight, Es))
    for x, y in zip(grads["envelope"], grads["autodiff"]):
        assert _rel(x, y) < 1e-5


def test_sinkhorn_projection_is_trainable_state_and_required():
    s, t, Es, Et, mask = _setup(seed=6)
    loss = build_loss("sinkhorn", topk=3)
    with pytest.raises(ConfigError, match="prepare"):
        loss(s.float(), TeacherSignal(logits=t.float()), mask, student_embeddings=Es.float(), teacher_embeddings=Et.float())
    with pytest.raises(ConfigError, match="teacher_embeddings"):
        loss(s.float(), TeacherSignal(logits=t.float()), mask, student_embeddings=Es.float())
    loss.prepare(student_embeddings=Es.float(), teacher_embeddings=Et.float())
    names = [n for n, p in loss.named_parameters() if p.requires_grad]
    assert names == ["projection.weight"] and loss.projection.weight.shape == (5, 8)
    # least-squares initialisation: E_t P^T is the best linear fit of E_s
    fit = torch.linalg.lstsq(Et, Es).solution.t().float()
    torch.testing.assert_close(loss.projection.weight.detach(), fit, rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    before = loss.projection.weight.detach().clone()
    out = loss(s.float(), TeacherSignal(logits=t.float()), mask, student_embeddings=Es.float(), teacher_embeddings=Et.float())
    out.value.backward()
    opt.step()
    assert not torch.equal(before, loss.projection.weight.detach())
    fresh = build_loss("sinkhorn", topk=3, student_dim=5, teacher_dim=8)
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh.projection.weight, loss.projection.weight)
    same_width = build_loss("sinkhorn").prepare(student_embeddings=Es, teacher_embeddings=Es)
    assert same_width.projection is None and not list(same_width.parameters())


def test_sinkhorn_and_hybrid_from_a_topk_cache():
    s, t, Es, Et, mask = _setup(seed=7)
    full = TeacherSignal(logits=t)
    V = t.shape[-1]
    for name, extra in [("sinkhorn", {}), ("hybrid", {"weight": 0.3})]:
        loss = build_loss(name, topk=4, iters=100, support="teacher", **extra).double()
        loss.prepare(student_embeddings=Es, teacher_embeddings=Et)
        kw = dict(student_embeddings=Es, teacher_embeddings=Et)
        dense = loss(s, full, mask, **kw).value
        whole = loss(s, TeacherSignal.topk_from_logits(t, V), mask, **kw).value
        assert whole.item() == pytest.approx(dense.item(), rel=1e-9)
        part = loss(s, TeacherSignal.topk_from_logits(t, 6), mask, **kw).value
        assert torch.isfinite(part) and part.item() > 0
    with pytest.raises(ConfigError, match="exceeds the teacher cache"):
        build_loss("sinkhorn", topk=8).double().prepare(student_embeddings=Es, teacher_embeddings=Et)(
            s, TeacherSignal.topk_from_logits(t, 6), mask, student_embeddings=Es, teacher_embeddings=Et)


def test_hybrid_is_the_weighted_sum_of_its_parts():
    s, t, Es, Et, mask = _setup(seed=8)
    kw = dict(student_embeddings=Es, teacher_embeddings=Et)
    hyb = build_loss("hybrid", temperature=2.0, topk=4, weight=0.3).double()
    hyb.prepare(**kw)
    ot_only = build_loss("sinkhorn", temperature=2.0, topk=4).double()
    ot_only.projection = hyb.projection
    kl = build_loss("fkl", temperature=2.0)
    out = hyb(s, TeacherSignal(logits=t), mask, **kw)
    want = 0.3 * ot_only(s, TeacherSignal(logits=t), mask, **kw).value + 0.7 * kl(s, TeacherSignal(logits=t), mask).value
    assert out.value.item() == pytest.approx(want.item(), rel=1e-12)
    assert set(out.parts) >= {"hybrid", "ot", "fkl", "ot_linear"}
    g1, = torch.autograd.grad(out.value, s)
    g2, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2)


# ---------------------------------------------------------------------------------------------
# layer_emd
# ---------------------------------------------------------------------------------------------


def test_layer_emd_matches_a_loop_with_pot_emd2_and_updates_its_weights():
    g = torch.Generator().manual_seed(9)
    B, T, V, M, N, ds, dt = 2, 4, 9, 2, 3, 4, 6
    s = torch.randn(B, T, V, generator=g, dtype=D64)
    t = torch.randn(B, T, V, generator=g, dtype=D64)
    hs = tuple(torch.randn(B, T + 1, ds, generator=g, dtype=D64).requires_grad_() for _ in range(M + 1))
    ht = tuple(torch.randn(B, T + 1, dt, generator=g, dtype=D64) * (1 + 3 * j) for j in range(N + 1))
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    loss = build_loss("layer_emd", logit_loss="none", beta=2.0).prepare(
        student_hidden_size=ds, teacher_hidden_size=dt, student_layers=M, teacher_layers=N).double()
    W = loss.projection.weight
    out = loss(s, TeacherSignal(logits=t, hidden_states=ht), mask, student_hidden=hs, num_items=10)
    # reference: loops over layers and positions, exact EMD from POT
    rms = lambda x: x / x.pow(2).mean().add(1e-6).sqrt()  # noqa: E731
    D = torch.zeros(M, N, dtype=D64)
    for i in range(M):
        for j in range(N):
            for b, p in mask.nonzero().tolist():
                D[i, j] = D[i, j] + ((W @ rms(hs[i + 1][b, p]) - rms(ht[j + 1][b, p])) ** 2).mean()
    D = D / 10
    w_s, w_t = np.full(M, 1 / M), np.full(N, 1 / N)
    ref = 2.0 * ot.emd2(w_s, w_t, D.detach().numpy())
    assert out.value.item() == pytest.approx(ref, rel=1e-9)
    assert out.parts["emd_hidden"] == pytest.approx(ref / 2, rel=1e-9)
    F = torch.tensor(ot.emd(w_s, w_t, D.detach().numpy()))
    ref_t = 2.0 * (F * D).sum()
    got = torch.autograd.grad(out.value, hs[1:] + (W,))
    want = torch.autograd.grad(ref_t, hs[1:] + (W,))
    for x, y in zip(got, want):
        assert _rel(x, y) < 1e-9
    # weights: w_k / c_k renormalised, c_k the layer's transport cost; buffers in the state dict
    c_s, c_t = (F * D).sum(1).detach(), (F * D).sum(0).detach()
    exp_s = torch.tensor(w_s) / c_s
    exp_t = torch.tensor(w_t) / c_t
    torch.testing.assert_close(loss.weight_student, exp_s / exp_s.sum())
    torch.testing.assert_close(loss.weight_teacher, exp_t / exp_t.sum())
    assert {"weight_student", "weight_teacher", "projection.weight"} <= set(loss.state_dict())
    # eval mode leaves the weights alone; a missing teacher state is a clear error
    loss.eval()
    before = loss.weight_student.clone()
    loss(s, TeacherSignal(logits=t, hidden_states=ht), mask, student_hidden=hs)
    assert torch.equal(before, loss.weight_student)
    with pytest.raises(ValueError, match="teacher hidden states"):
        loss(s, TeacherSignal(logits=t), mask, student_hidden=hs)
    with pytest.raises(ConfigError, match="prepared for 2 student / 3 teacher layers"):
        loss(s, TeacherSignal(logits=t, hidden_states=ht[:-1]), mask, student_hidden=hs)


def test_layer_emd_with_attention_maps_and_logit_term():
    g = torch.Generator().manual_seed(10)
    B, T, V, M, N, d = 1, 3, 7, 2, 2, 4
    s = torch.randn(B, T, V, generator=g, dtype=D64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=D64)
    hs = tuple(torch.randn(B, T + 1, d, generator=g, dtype=D64) for _ in range(M + 1))
    ht = tuple(torch.randn(B, T + 1, d, generator=g, dtype=D64) for _ in range(N + 1))
    att = lambda: tuple(torch.softmax(torch.randn(B, 2, T + 1, T + 1, generator=g, dtype=D64), -1)  # noqa: E731
                        for _ in range(M))
    a_s, a_t = att(), att()
    mask = torch.ones(B, T, dtype=torch.bool)
    loss = build_loss("layer_emd", attention=True, beta=0.5, beta_attention=0.25).prepare(
        student_hidden_size=d, teacher_hidden_size=d, student_layers=M, teacher_layers=N).double().eval()
    out = loss(s, TeacherSignal(logits=t, hidden_states=ht, attentions=a_t), mask, student_hidden=hs,
               student_attentions=a_s)
    fkl = build_loss("fkl")(s, TeacherSignal(logits=t), mask).value
    assert out.value.item() == pytest.approx(fkl.item() + 0.5 * out.parts["emd_hidden"]
                                             + 0.25 * out.parts["emd_attention"], rel=1e-12)
    Da = torch.tensor([[sum(((a_s[i].mean(1)[0, p] - a_t[j].mean(1)[0, p]) ** 2).mean() for p in range(T)) / T
                        for j in range(N)] for i in range(M)], dtype=D64)
    assert out.parts["emd_attention"] == pytest.approx(ot.emd2(np.full(M, 0.5), np.full(N, 0.5), Da.numpy()), rel=1e-9)
    with pytest.raises(ValueError, match="attention maps"):
        loss(s, TeacherSignal(logits=t, hidden_states=ht), mask, student_hidden=hs, student_attentions=a_s)


def test_exported_problems_reproduce_the_loss_with_pot():
    s, t, Es, Et, mask = _setup(seed=11)
    loss = build_loss("sinkhorn", topk=4, iters=50, value="linear", masses="rest", cost="euclidean").double()
    loss.prepare(student_embeddings=Es, teacher_embeddings=Et)
    kw = dict(student_embeddings=Es, teacher_embeddings=Et)
    out = loss(s, TeacherSignal(logits=t), mask, **kw)
    problems = loss.export_problems(s, TeacherSignal(logits=t), mask, **kw)
    assert len(problems) == int(mask.sum()) and all(C.shape == (a.numel(), b.numel()) for a, b, C in problems)
    ref = np.mean([ot.sinkhorn2(a.numpy(), b.numpy(), C.numpy(), 0.1, numItermax=50, stopThr=0.0)
                   for a, b, C in problems])
    assert out.value.item() == pytest.approx(ref, rel=1e-9)


def test_bfloat16_products_stay_close_to_float32():
    s, t, Es, Et, mask = _setup(seed=12)
    s, t, Es, Et = s.detach().float().requires_grad_(), t.float(), Es.float(), Et.float()
    kw = dict(student_embeddings=Es, teacher_embeddings=Et)
    out = {}
    for precision in ["float32", "bfloat16"]:
        loss = build_loss("sinkhorn", topk=4, cost="euclidean", precision=precision)
        torch.manual_seed(0)
        loss.prepare(**kw)
        v = loss(s, TeacherSignal(logits=t), mask, **kw).value
        out[precision] = (v,) + torch.autograd.grad(v, (s, loss.projection.weight))
    for x, y in zip(out["bfloat16"], out["float32"]):
        assert _rel(x, y) < 2e-2
    assert abs(out["bfloat16"][0].item() - out["float32"][0].item()) < 5e-3 * out["float32"][0].item()


def test_sinkhorn_student_ruling_out_the_whole_teacher_support_stays_finite():
    s, t, Es, Et, mask = _setup(seed=13)
    s = s.detach().clone()
    top_t = t.topk(4, -1).indices
    s.scatter_(-1, top_t, float("-inf"))           # the student gives no mass to the teacher's top 4
    s.requires_grad_()
    for masses in ["renormalize", "rest"]:
        loss = build_loss("sinkhorn", topk=4, support="teacher", masses=masses).double()
        loss.prepare(student_embeddings=Es, teacher_embeddings=Et)
        out = loss(s, TeacherSignal(logits=t), mask, student_embeddings=Es, teacher_embeddings=Et)
        g, = torch.autograd.grad(out.value, s)
        assert torch.isfinite(out.value) and out.value.item() > 0 and torch.isfinite(g).all()


def test_sinkhorn_rest_masses_from_bfloat16_logits_with_minus_inf():
    s, t, Es, Et, mask = _setup(seed=14)
    x = s.detach().clone()
    x[0, 0, :5] = float("-inf")
    x = x.to(torch.bfloat16).requires_grad_()
    loss = build_loss("sinkhorn", topk=4, masses="rest", temperature=2.0)
    loss.prepare(student_embeddings=Es.float(), teacher_embeddings=Et.float())
    out = loss(x, TeacherSignal(logits=t.float()), mask, student_embeddings=Es.float(), teacher_embeddings=Et.float())
    out.value.backward()
    assert torch.isfinite(out.value) and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    # the rest point holds the mass outside the support, so the full softmax shapes the gradient
    assert int((x.grad[mask] != 0).sum()) > 4 * int(mask.sum())

"""Speed and memory of every distillation loss on the same logits, and the Sinkhorn loss against POT.

    python benchmarks/losses.py                     # 2048 positions, V = 49152, float32
    python benchmarks/losses.py --positions 256 --vocab 8192 --repeats 1      # quick look

One line per loss: forward + backward time (best of --repeats; wall clock, and CPU time of the
process, which a shared machine disturbs less when run with --threads 1), its ratio to fkl, and the
peak extra memory (growth of the resident set's high-water mark during the first forward +
backward, in a fresh process per loss, the mark reset just before), also relative to one logits
tensor (N x V x 4 bytes). The student logits require grad and are a leaf, so their .grad (one
logits-sized tensor) counts as extra memory.

Inputs, identical for every loss (seeded): student and teacher logits share a Zipf-like prior over
token ids (frequent tokens first, as in BPE vocabularies) plus per-position context noise, the
teacher less noisy than the student. Shapes of the `quickstart` preset, whose 49152-token
vocabulary this is: a SmolLM2-135M teacher (576 wide, 30 layers) and a student cut from it, so
both embedding matrices are 576 wide (the student's drifted from the teacher's); hidden states of
10 / 30 layers for layer_emd's layer mapping. OT losses: k = 100, euclidean cost, epsilon 0.1, 50
iterations. Extra lines: `sinkhorn_bf16`, the same with precision=bfloat16; `sinkhorn_proj`, a
960-wide teacher (SmolLM2-360M) so that a trainable projection 960 -> 576 enters the costs and
gets gradients each step.

The POT comparison solves the very problems the sinkhorn loss builds (same supports, masses and
normalised costs, exported by `SinkhornLoss.export_problems`), 50 iterations without early stop,
batched solvers on the same groups of 256 problems of similar size:
- ours: the batched solver with envelope gradients, forward + backward to the student masses;
- POT, one position at a time, `ot.sinkhorn2` on torch tensors (autograd through the iterations,
  the way a per-position training loss uses it), forward + backward to the masses; and, for
  information, on float64 NumPy arrays (forward only: no gradient);
  both timed on --pot-subset positions and scaled to all positions;
- POT batched, `ot.batch.solve_batch` (log-domain Sinkhorn, float32, grad="envelope"), forward +
  backward of value_linear to the costs (its envelope gradient does not reach the masses). It is
  given the transposed problems (C^T, b, a): its updates run rows-then-columns, POT's sinkhorn2
  and ours columns-then-rows, and transposing makes all three the same iterates and values.
Values are compared as the max relative difference of the per-position transport costs <T, C>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LOSSES = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "l1", "l2", "w1_cdf", "sorted_w1", "sinkhorn", "sinkhorn_bf16",
          "sinkhorn_proj", "hybrid", "layer_emd"]
OT = {"topk": 100, "cost": "euclidean", "epsilon": 0.1, "iters": 50}
PARAMS = {"sinkhorn": OT, "hybrid": OT, "sinkhorn_bf16": {**OT, "precision": "bfloat16"}, "sinkhorn_proj": OT}
VARIANT_OF = {"sinkhorn_bf16": "sinkhorn", "sinkhorn_proj": "sinkhorn"}   # benchmark line -> registered loss
DS, LS, LT = 576, 10, 30          # SmolLM2-135M teacher width and depth; a 10-layer student for layer_emd
DT_PROJ = 960                     # SmolLM2-360M width, for the projection line
GROUP = 256                       # problems per padded batch in the POT comparison


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def reset_peak() -> int:
    """Reset the resident-set high-water mark (Linux: clear_refs 5); return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    try:
        return _status("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_inputs(N: int, V: int, seed: int = 0, hidden: bool = False, teacher_width: int = DS):
    """Logits (1, N, V) float32 for student (leaf, requires grad) and teacher, embeddings, hidden states.
    Built in row blocks so that no temporary larger than a block ever exists (clean memory baseline)."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    s = torch.empty(1, N, V)
    t = torch.empty(1, N, V)
    for i in range(0, N, 64):
        n = min(64, N - i)
        base = prior + 2.0 * torch.randn(n, V, generator=g)
        t[0, i:i + n] = base + 0.5 * torch.randn(n, V, generator=g)
        s[0, i:i + n] = base + 1.0 * torch.randn(n, V, generator=g)
        del base
    s.requires_grad_()
    Et = torch.randn(V, teacher_width, generator=g) * 0.05
    if teacher_width == DS:     # the student's embeddings started as the teacher's and drifted
        Es = Et + torch.randn(V, DS, generator=g) * 0.01
    else:
        Es = torch.randn(V, DS, generator=g) * 0.05
    hs = ht = None
    if hidden:
        hs = tuple(torch.randn(1, N + 1, DS, generator=g).requires_grad_() for _ in range(LS + 1))
        ht = tuple(torch.randn(1, N + 1, teacher_width, generator=g) * (1 + j / 8) for j in range(LT + 1))
    return s, t, Es, Et, hs, ht


def build(name, V, Es, Et):
    from pesc.losses import build_loss

    loss = build_loss(VARIANT_OF.get(name, name), temperature=1.0, vocab_size=V, **PARAMS.get(name, {}))
    loss.prepare(student_embeddings=Es, teacher_embeddings=Et, student_hidden_size=DS,
                 teacher_hidden_size=Et.shape[-1], student_layers=LS, teacher_layers=LT)
    return loss


def child_loss(name: str, N: int, V: int, repeats: int) -> dict:
    from pesc.losses import TeacherSignal

    s, t, Es, Et, hs, ht = make_inputs(N, V, hidden=name == "layer_emd",
                                       teacher_width=DT_PROJ if name == "sinkhorn_proj" else DS)
    loss = build(name, V, Es, Et)
    teacher = TeacherSignal(logits=t, hidden_states=ht)
    mask = torch.ones(1, N, dtype=torch.bool)
    kw = dict(student_embeddings=Es, teacher_embeddings=Et, student_hidden=hs)
    import gc

    gc.collect()
    base = reset_peak()
    peak_before = peak_rss_bytes()
    times, cpu, out = [], [], None
    for r in range(repeats):
        s.grad = None
        if hs is not None:
            for h in hs:
                h.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        out = loss(s, teacher, mask, **kw)
        out.value.backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if r == 0:
            extra = peak_rss_bytes() - max(base, peak_before)
    assert s.grad is not None and torch.isfinite(s.grad).all()
    return {"name": name, "time": min(times), "times": times, "cpu": min(cpu), "extra": max(extra, 0),
            "logits_bytes": s.numel() * 4, "baseline_slack": peak_before - base,
            "parts": {k: round(v, 6) for k, v in out.parts.items()}}


def child_pot(N: int, V: int, subset: int, repeats: int) -> dict:
    import numpy as np
    import ot
    from ot.batch import solve_batch

    from pesc.losses import TeacherSignal, build_loss
    from pesc.losses.ot import entropic_ot

    s, t, Es, Et, _, _ = make_inputs(N, V)
    teacher = TeacherSignal(logits=t)
    mask = torch.ones(1, N, dtype=torch.bool)
    kw = dict(student_embeddings=Es, teacher_embeddings=Et)
    loss = build_loss("sinkhorn", temperature=1.0, vocab_size=V, value="linear", **OT)
    loss.prepare(student_embeddings=Es, teacher_embeddings=Et)
    res = {}

    # full loss, forward + backward to the student logits
    times = []
    for _ in range(repeats):
        s.grad = None
        t0 = time.perf_counter()
        out = loss(s, teacher, mask, **kw)
        out.value.backward()
        times.append(time.perf_counter() - t0)
    res["loss_time"], res["loss_value"] = min(times), out.value.item()

    # the problems, sorted by size and padded per group of GROUP (as the loss chunks them; zero-mass
    # padding is invisible to the solver); ours and POT's batched solver get the same groups
    probs = loss.export_problems(s, teacher, mask, **kw)
    sizes = torch.tensor([a.numel() for a, _, _ in probs])
    order = torch.argsort(sizes, stable=True).tolist()
    groups = []
    for g0 in range(0, N, GROUP):
        members = order[g0:g0 + GROUP]
        W = int(sizes[members].max())
        a_g, b_g, C_g = torch.zeros(len(members), W), torch.zeros(len(members), W), torch.zeros(len(members), W, W)
        for j, i in enumerate(members):
            a, b, C = probs[i]
            n = a.numel()
            a_g[j, :n], b_g[j, :n], C_g[j, :n, :n] = a, b, C
        groups.append((members, a_g, b_g, C_g))
    res["support_mean"] = float(sizes.float().mean())
    res["support_max"] = int(sizes.max())
    eps, iters = OT["epsilon"], OT["iters"]

    # ours: batched solver, forward + envelope backward to the masses
    times = []
    ours_v = torch.zeros(N, dtype=torch.float64)
    for _ in range(repeats):
        leaves = [g[1].clone().requires_grad_() for g in groups]
        t0 = time.perf_counter()
        vals = [entropic_ot(C_g, a, b_g, eps, n_iters=iters, value="linear", grad="envelope")[0]
                for (_, _, b_g, C_g), a in zip(groups, leaves)]
        torch.autograd.grad(sum(v.sum() for v in vals), leaves)
        times.append(time.perf_counter() - t0)
    for (members, _, _, _), v in zip(groups, vals):
        ours_v[members] = v.detach().double()
    res["ours_time"] = min(times)
    res["ours_vs_loss_value"] = abs(ours_v.mean().item() - res["loss_value"]) / abs(res["loss_value"])

    # POT, one position at a time (torch, autograd through the iterations), on a subset
    idx = torch.linspace(0, N - 1, min(subset, N)).round().long().unique().tolist()
    t0 = time.perf_counter()
    leaves, vals = [], []
    for i in idx:
        a, b, C = probs[i]
        a = a.clone().requires_grad_()
        leaves.append(a)
        vals.append(ot.sinkhorn2(a, b, C, eps, numItermax=iters, stopThr=0.0))
    torch.autograd.grad(torch.stack(vals).sum(), leaves)
    res["pot_loop_torch_time"] = (time.perf_counter() - t0) * N / len(idx)
    pot_torch = torch.stack([x.detach() for x in vals]).double()

    t0 = time.perf_counter()
    pot_np = [ot.sinkhorn2(probs[i][0].double().numpy(), probs[i][1].double().numpy(),
                           probs[i][2].double().numpy(), eps, numItermax=iters, stopThr=0.0) for i in idx]
    res["pot_loop_numpy_time"] = (time.perf_counter() - t0) * N / len(idx)
    pot_np = torch.tensor(pot_np, dtype=torch.float64)
    res["subset"] = len(idx)

    # POT batched, same groups: transposed problems so that its iterates equal ours
    pot_batch = torch.zeros(N, dtype=torch.float64)
    t0 = time.perf_counter()
    for members, a_g, b_g, C_g in groups:
        M = C_g.transpose(1, 2).contiguous().requires_grad_()
        r = solve_batch(M, reg=eps, a=b_g, b=a_g, max_iter=iters, tol=0.0, grad="envelope")
        r.value_linear.sum().backward()
        pot_batch[members] = r.value_linear.detach().double()
    res["pot_batch_time"] = time.perf_counter() - t0

    rel = lambda x, y: float(((x - y).abs() / y.abs()).max())  # noqa: E731
    res["maxrel_vs_pot_numpy"] = rel(ours_v[idx], pot_np)
    res["maxrel_vs_pot_torch"] = rel(ours_v[idx], pot_torch)
    res["maxrel_vs_pot_batch"] = rel(ours_v, pot_batch)
    return res


def run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=2048, help="target positions (default 2048)")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per loss; the best is reported")
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of losses")
    ap.add_argument("--pot-subset", type=int, default=128,
                    help="positions POT solves one at a time (time scaled to all positions)")
    ap.add_argument("--no-pot", action="store_true", help="skip the POT comparison")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the per-loss lines (default: torch's choice, all cores); "
                         "1 is far less disturbed on a shared machine")
    ap.add_argument("--pot-threads", type=int, default=None,
                    help="threads for the POT comparison (default: all cores; our solver runs whole blocks of "
                         "problems on each core, POT's per-position loop cannot use them)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    N, V = args.positions, args.vocab
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "pot":
        print(json.dumps(child_pot(N, V, args.pot_subset, args.repeats)))
        return 0
    if args.child:
        print(json.dumps(child_loss(args.child, N, V, args.repeats)))
        return 0

    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = set(names) - set(LOSSES)
    if unknown:
        ap.error(f"unknown losses: {', '.join(sorted(unknown))}")
    if "fkl" not in names:
        names = ["fkl"] + names
    base = ["--positions", str(N), "--vocab", str(V), "--repeats", str(args.repeats)]
    common = base + (["--threads", str(args.threads)] if args.threads else [])
    logits_mb = N * V * 4 / 2**20
    print(f"# {N} positions x vocabulary {V}, float32 (one logits tensor = {logits_mb:.0f} MiB), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; best of {args.repeats}")
    print(f"{'loss':<14} {'fwd+bwd s':>10} {'x fkl':>7} {'cpu s':>7} {'x fkl':>7} {'extra MiB':>10} "
          f"{'x logits':>9}  parts")
    rows = {}
    for name in names:
        r = run_child(["--child", name, *common])
        rows[name] = r
        f = rows["fkl"]
        print(f"{name:<14} {r['time']:>10.2f} {r['time'] / f['time']:>7.2f} {r['cpu']:>7.2f} "
              f"{r['cpu'] / f['cpu']:>7.2f} {r['extra'] / 2**20:>10.0f} {r['extra'] / r['logits_bytes']:>9.2f}  "
              f"{r['parts']}", flush=True)
    checks = []
    f = rows["fkl"]
    checks.append(("fkl peak extra memory <= 1.5 x logits", f["extra"] / f["logits_bytes"], 1.5, "<="))
    for name, limit in [("sinkhorn", 3.0), ("w1_cdf", 3.0)]:
        if name in rows:
            checks.append((f"{name} time <= {limit:g} x fkl (wall)", rows[name]["time"] / f["time"], limit, "<="))
            checks.append((f"{name} time <= {limit:g} x fkl (cpu)", rows[name]["cpu"] / f["cpu"], limit, "<="))
    if not args.no_pot:
        pot_threads = args.pot_threads or os.cpu_count() or 1
        p = run_child(["--child", "pot", *base, "--pot-subset", str(args.pot_subset), "--threads", str(pot_threads)])
        print(f"\n# sinkhorn vs POT on the same {N} problems (support mean {p['support_mean']:.0f}, "
              f"max {p['support_max']}; k={OT['topk']}, euclidean, epsilon {OT['epsilon']}, {OT['iters']} "
              f"iterations), {pot_threads} threads; POT per position timed on {p['subset']} positions and scaled")
        print(f"ours, full loss (top-k, costs, OT, backward to logits)   {p['loss_time']:8.2f} s")
        print(f"ours, OT solve, fwd + bwd to masses                      {p['ours_time']:8.2f} s")
        print(f"POT ot.sinkhorn2 per position, torch, fwd + bwd          {p['pot_loop_torch_time']:8.2f} s  "
              f"(ours solve {p['pot_loop_torch_time'] / p['ours_time']:.0f}x, full loss "
              f"{p['pot_loop_torch_time'] / p['loss_time']:.1f}x faster)")
        print(f"POT ot.sinkhorn2 per position, numpy float64, fwd only   {p['pot_loop_numpy_time']:8.2f} s  "
              f"(ours solve {p['pot_loop_numpy_time'] / p['ours_time']:.1f}x)")
        print(f"POT ot.batch.solve_batch, fwd + bwd to costs             {p['pot_batch_time']:8.2f} s  "
              f"(ours solve {p['pot_batch_time'] / p['ours_time']:.0f}x, full loss "
              f"{p['pot_batch_time'] / p['loss_time']:.1f}x faster)")
        print(f"max relative difference of <T, C>: vs POT numpy {p['maxrel_vs_pot_numpy']:.1e}, vs POT torch "
              f"{p['maxrel_vs_pot_torch']:.1e}, vs solve_batch {p['maxrel_vs_pot_batch']:.1e}; "
              f"solver vs loss value {p['ours_vs_loss_value']:.1e}")
        checks += [("OT solve >= 20x faster than POT sinkhorn2 per position (torch)",
                    p["pot_loop_torch_time"] / p["ours_time"], 20.0, ">="),
                   ("OT solve >= 2x faster than POT solve_batch", p["pot_batch_time"] / p["ours_time"], 2.0, ">="),
                   ("full loss >= 2x faster than POT solve_batch (solve only)",
                    p["pot_batch_time"] / p["loss_time"], 2.0, ">="),
                   ("same values: max relative difference <= 1e-4",
                    max(p["maxrel_vs_pot_numpy"], p["maxrel_vs_pot_torch"], p["maxrel_vs_pot_batch"]), 1e-4, "<=")]
    print()
    ok = True
    for what, val, lim, op in checks:
        good = val <= lim if op == "<=" else val >= lim
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  {what}: {val:.3g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generation speed: batched across dialogues (pesc.generation) vs one dialogue at a time.

Both sides fill every supporter turn of the test file turn by turn, with the same prompts
(pesc.data.examples.fit_prompt), the same greedy decoding and the same cleaning; the baseline calls
`model.generate` once per turn of one dialogue at a time. Printed: time, turns per second, the
speed-up, and how many replies are identical on both sides.

    python benchmarks/generation.py                       # builds and briefly trains a smoke student
    python benchmarks/generation.py --model runs/smoke-fkl/student
    python benchmarks/generation.py --dialogues 30        # a quicker partial run

Without --model, the smoke student is built here: a byte-level BPE tokenizer trained on val.json,
the 2-layer tiny Llama of pesc.models.smoke, and a few hundred SFT steps on val.json so that it ends
its replies (an untrained model never emits the end token and every reply runs to max_new_tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pesc.data.dialogue import SUPPORTER, Turn  # noqa: E402
from pesc.generation import (GenerationOptions, Request, _fit_from, _last_seeker, generate_dialogues,  # noqa: E402
                             reply_batch, resolve_decoding, special_token_strings)

SHARED = REPO.parent / "shared" / "data" / "pesc"


def smoke_student(dialogues, sft_steps: int, seed: int = 0, log=print):
    """Tokenizer trained on `dialogues`, a tiny 2-layer Llama, `sft_steps` of plain SFT on them."""
    from pesc.data.examples import build_examples, collate
    from pesc.models.smoke import tiny_model, train_tokenizer

    t0 = time.time()
    tok = train_tokenizer(dialogues, 2048)
    model = tiny_model(len(tok), 2, 64, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if sft_steps > 0:
        examples = build_examples(dialogues, tok, max_length=384)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(sft_steps):
            idx = torch.randint(len(examples), (16,), generator=g).tolist()
            batch = collate([examples[i] for i in idx], tok.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if (step + 1) % 100 == 0 or step + 1 == sft_steps:
                log(f"  sft step {step + 1}/{sft_steps}: loss {loss.item():.3f}")
    model.eval()
    log(f"smoke student ready in {time.time() - t0:.1f}s ({sum(p.numel() for p in model.parameters()):,} params)")
    return model, tok


def one_at_a_time(model, tok, dialogues, options):
    """The baseline: each dialogue on its own, one model.generate call per supporter turn."""
    dec = resolve_decoding(model, tok, options)
    specials = special_token_strings(tok)
    out = []
    for d in dialogues:
        own: list[str] = []
        for i in d.supporter_indices():
            hist, k = [], 0
            for t in d.turns[:i]:
                if t.role == SUPPORTER:
                    hist.append(Turn(SUPPORTER, own[k]))
                    k += 1
                else:
                    hist.append(t)
            prompt = _fit_from(tok, d.profile, hist, dec.max_prompt_tokens, 0, dec.context_limit).ids
            req = Request(prompt, d.id, i, _last_seeker(hist))
            texts, _ = reply_batch(model, tok, [req], dec, specials)
            own.append(texts[0])
        out.append(d.with_supporter_texts(own))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory or Hub id (default: build the smoke student here)")
    ap.add_argument("--test", default=str(SHARED / "test.json"))
    ap.add_argument("--val", default=str(SHARED / "val.json"), help="training text of the smoke student")
    ap.add_argument("--dialogues", type=int, default=None, help="only the first N test dialogues")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt budget (default 1024)")
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--save-student", metavar="DIR", help="also save the smoke student built here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine, several threads spin against other "
                         "processes and the timings become noise)")
    args = ap.parse_args(argv)
    from submission.taskfile import load_task

    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_task(args.test).dialogues[: args.dialogues]
    if args.model:
        from pesc.models import load_model, load_tokenizer

        tok, model = load_tokenizer(args.model), load_model(args.model, device="cpu")
    else:
        model, tok = smoke_student(load_task(args.val).dialogues, args.sft_steps)
        if args.save_student:
            model.save_pretrained(args.save_student)
            tok.save_pretrained(args.save_student)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=False, batch_size=args.batch_size,
                                max_prompt_tokens=args.max_prompt_tokens)
    n_turns = sum(len(d.supporter_indices()) for d in test)
    dec = resolve_decoding(model, tok, options)
    print(f"{len(test)} dialogues, {n_turns} supporter turns, greedy, max_new_tokens {dec.max_new_tokens}, "
          f"prompt budget {dec.max_prompt_tokens} tokens, {torch.get_num_threads()} torch threads")

    t0, c0 = time.perf_counter(), time.process_time()
    batched = generate_dialogues(model, tok, test, options, progress=False)
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
    st = batched.stats
    reuse = st.get("prefix_tokens_reused", 0) / max(1, st.get("prefix_tokens_reused", 0) + st.get("prefix_tokens_computed", 0))
    print(f"batched:          {t_batched:8.1f}s wall {c_batched:8.1f}s cpu  {n_turns / t_batched:8.1f} turns/s  "
          f"({st['generate_calls']} generate calls, {100 * reuse:.0f}% of prompt tokens reused from the previous turn)")

    t0, c0 = time.perf_counter(), time.process_time()
    single = one_at_a_time(model, tok, test, options)
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
    print(f"one at a time:    {t_single:8.1f}s wall {c_single:8.1f}s cpu  {n_turns / t_single:8.1f} turns/s  "
          f"({n_turns} generate calls)")
    print(f"speed-up:         {t_single / t_batched:8.1f}x wall, {c_single / c_batched:.1f}x cpu time")
    a = [t.text for d in batched for t in d.turns if t.role == SUPPORTER]
    b = [t.text for d in single for t in d.turns if t.role == SUPPORTER]
    same = sum(x == y for x, y in zip(a, b))
    words = sum(len(x.split()) for x in a) / max(1, len(a))
    print(f"identical replies: {same}/{len(a)}; mean reply length {words:.1f} words; "
          f"e.g. {a[0][:100]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""pesc.generation: cleaning, decoding resolution, batched == one-at-a-time, sampling keyed per row,
empty-reply policy, resumable checkpoints (in-process and a SIGKILLed subprocess), chat streaming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pesc.generation as G
from pesc.data.dialogue import SEEKER, SUPPORTER, Turn
from pesc.errors import ConfigError, DataError
from pesc.generation import (FALLBACK_REPLY, GenerationOptions, RowSampler, clean_reply, generate_dialogues,
                             generate_reply, resolve_decoding, row_seed, split_reply, stream_reply, uniform_for)
from submission.taskfile import load_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIX = Path(__file__).resolve().parent / "fixtures" / "submission"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained on the fixture dialogues and an untrained 2-layer Llama, also saved to disk."""
    from pesc.models.smoke import tiny_model, train_tokenizer

    tok = train_tokenizer(load_task(FIX / "small_val.json").dialogues, 512)
    model = tiny_model(len(tok), 2, 32, seed=0).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


@pytest.fixture(scope="module")
def test_dialogues():
    return load_task(FIX / "small_test.json").dialogues


def supporter_texts(dialogues):
    return [t.text for d in dialogues for t in d.turns if t.role == SUPPORTER]


# ------------------------------------------------------------------------------------------------
# cleaning

@pytest.mark.parametrize("raw, expected", [
    ("Supporter: That sounds hard.", "That sounds hard."),
    ("  supporter :  I hear you.", "I hear you."),
    ("assistant\nYou are not alone.", "You are not alone."),
    ("<|im_start|>assistant\nTake a breath.<|im_end|>\n<|im_start|>user\nok", "Take a breath."),
    ("That must hurt.\nSeeker: yes it does\nSupporter: sorry", "That must hurt."),
    ("I understand. seeker: extra", "I understand."),
    ("Try a walk.\nUser: fine", "Try a walk."),
    ("Rest tonight.<|endoftext|><|pad|><|pad|>", "Rest tonight."),
    ("Call her.</s> more", "Call her."),
    ("Good plan. <|eot_id|>ignored", "Good plan."),
    ("Odd marker <|custom_tag|> cut here", "Odd marker"),
    ("line one\n\nline   two\tthree", "line one line two three"),
    ("<|im_end|>", ""),
    ("   \n  ", ""),
    ("Supporter: Seeker: nothing", ""),
])
def test_clean_reply_cases(raw, expected):
    assert clean_reply(raw) == expected


def test_clean_reply_strips_echo_and_tokenizer_specials():
    assert clean_reply("I feel lost at work. That sounds exhausting.", echo="I feel lost  at work.") == \
        "That sounds exhausting."
    assert clean_reply("Well <|weird|> x", special_tokens=("[SEP]",)) == "Well"
    assert clean_reply("Fine [SEP] rest", special_tokens=("[SEP]",)) == "Fine"


def test_clean_reply_caps_length_at_a_sentence_end():
    text = "First sentence here. Second one is a bit longer. " + "word " * 100
    out = clean_reply(text, max_chars=60)
    assert out == "First sentence here. Second one is a bit longer."
    no_stop = "word " * 40
    out = clean_reply(no_stop, max_chars=50)
    assert len(out) <= 50 and out.endswith("word") and " " not in out[-4:]


def test_split_reply_reports_whether_a_turn_ended():
    assert split_reply("Okay then") == ("Okay then", False)
    body, ended = split_reply("Okay then<|im_end|>")
    assert body == "Okay then" and ended
    assert split_reply("Okay\nSeeker: hi")[1] is True


# ------------------------------------------------------------------------------------------------
# decoding options

def test_options_validate():
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(temperature=-1.0), dict(batch_size="many"),
                dict(batch_size=0), dict(repetition_penalty=0.0), dict(max_prompt_tokens=2)):
        with pytest.raises(ConfigError):
            GenerationOptions(**bad)
    assert GenerationOptions(batch_size="8").batch_size == 8


def test_resolve_decoding_falls_back_to_generation_config(tiny):
    model, tok, _ = tiny
    gc = model.generation_config
    saved = (gc.max_new_tokens, gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty)
    try:
        gc.max_new_tokens, gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty = 7, True, 0.6, 0.9, 1.3
        d = resolve_decoding(model, tok)
        assert (d.max_new_tokens, d.do_sample, d.temperature, d.top_p, d.repetition_penalty) == (7, True, 0.6, 0.9, 1.3)
        d = resolve_decoding(model, tok, GenerationOptions(max_new_tokens=5, do_sample=False, top_p=0.5))
        assert (d.max_new_tokens, d.do_sample, d.temperature, d.top_p) == (5, False, 0.6, 0.5)
    finally:
        gc.max_new_tokens, gc.do_sample, gc.temperature, gc.top_p, gc.repetition_penalty = saved
    d = resolve_decoding(model, tok)
    assert d.max_new_tokens == G.DEFAULT_MAX_NEW_TOKENS and d.do_sample is False
    assert d.stop_ids[0] == tok.eos_token_id and d.pad_id == tok.pad_token_id
    assert d.max_prompt_tokens == G.DEFAULT_MAX_PROMPT_TOKENS
    with pytest.raises(ConfigError, match="context"):
        resolve_decoding(model, tok, GenerationOptions(max_prompt_tokens=4090, max_new_tokens=100))


# ------------------------------------------------------------------------------------------------
# row-keyed sampling

def test_uniform_and_row_seed_are_pure_functions():
    seeds = np.array([1, 2, 3, 2 ** 63 + 5], dtype=np.uint64)
    u = uniform_for(seeds, 4)
    assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    assert np.array_equal(u, uniform_for(seeds, 4))
    assert not np.array_equal(u, uniform_for(seeds, 5))
    assert uniform_for(seeds[1:2], 4)[0] == u[1]  # a row's number does not depend on the others
    assert row_seed(0, "9001", 3, 0) == row_seed(0, "9001", 3, 0) != row_seed(0, "9001", 3, 1)
    big = uniform_for(np.arange(20000, dtype=np.uint64), 0)
    assert abs(big.mean() - 0.5) < 0.01


def test_row_sampler_draws_independently_of_the_batch():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g)
    ids = torch.zeros((4, 7), dtype=torch.long)
    seeds = [11, 22, 33, 44]
    full = RowSampler(seeds, 5, 0.9, 0.95, 0)(ids, scores.clone()).argmax(-1)
    for r in range(4):
        alone = RowSampler([seeds[r]], 5, 0.9, 0.95, 0)(ids[r:r + 1], scores[r:r + 1].clone()).argmax(-1)
        assert int(alone) == int(full[r])
    out = RowSampler(seeds, 5, 1.0, 1.0, 0)(ids, scores.clone())
    assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one token allowed per row
    # top_p tiny: only the most likely token survives; banned tokens are never drawn at step 0
    top = RowSampler(seeds, 5, 1.0, 1e-6, 0)(ids, scores.clone()).argmax(-1)
    assert torch.equal(top, scores.argmax(-1))
    banned = scores.argmax(-1).tolist()
    drawn = RowSampler(seeds, 7, 1.0, 1e-6, 0, banned_first=banned)(ids, scores.clone()).argmax(-1)
    assert not any(int(drawn[r]) in banned for r in range(4))


# ------------------------------------------------------------------------------------------------
# dialogues

def test_every_supporter_turn_is_filled_and_seekers_kept(tiny, test_dialogues):
    model, tok, _ = tiny
    out = generate_dialogues(model, tok, test_dialogues, GenerationOptions(max_new_tokens=6), progress=False)
    assert [d.id for d in out] == [d.id for d in test_dialogues]
    for src, got in zip(test_dialogues, out):
        assert len(got.turns) == 20
        assert [t.text for t in got.turns if t.role == SEEKER] == [t.text for t in src.turns if t.role == SEEKER]
        assert [t.sep for t in got.turns] == [t.sep for t in src.turns]
        assert got.profile == src.profile
        assert all(t.text.strip() and "\n" not in t.text for t in got.turns if t.role == SUPPORTER)
    assert out.stats["turns"] == 30 and out.stats["rows"] == 30
    assert out.stats["prefix_tokens_reused"] > out.stats["prefix_tokens_computed"] / 2


def test_turn_sees_own_earlier_replies_or_gold(tiny, test_dialogues, monkeypatch):
    model, tok, _ = tiny
    seen = []
    real_fit = G._fit_from

    def spy(tokenizer, profile, history, budget, start=0, hard_limit=None):
        seen.append((len(history), [t.text for t in history if t.role == SUPPORTER]))
        return real_fit(tokenizer, profile, history, budget, start, hard_limit)

    monkeypatch.setattr(G, "_fit_from", spy)
    d = test_dialogues[0]
    out = generate_dialogues(model, tok, [d], GenerationOptions(max_new_tokens=5), progress=False)
    own = supporter_texts(out)
    for k, (n_turns, hist) in enumerate(seen):
        assert n_turns == 2 * k + 1 and hist == own[:k]
    gold = load_task(FIX / "small_val.json").dialogues[0]
    seen.clear()
    generate_dialogues(model, tok, [gold], GenerationOptions(max_new_tokens=5), use_gold_history=True,
                       progress=False)
    assert seen[-1][1] == supporter_texts([gold])[:9]


def test_prompt_search_from_the_previous_start_equals_fit_prompt(tiny):
    from pesc.data.examples import fit_prompt, render_prompt

    _, tok, _ = tiny
    d = load_task(FIX / "small_val.json").dialogues[2]
    for budget in (240, 400, 800):
        start, cut = 0, 0
        for i in range(1, 20, 2):
            fitted = G._fit_from(tok, d.profile, d.turns[:i], budget, start)
            assert fitted.ids == fit_prompt(tok, d.profile, d.turns[:i], budget) and fitted.note is None
            start = fitted.start
            cut = max(cut, start)
        assert (cut > 0) == (budget < 800)  # the small budgets really dropped history
    # where training would refuse, generation answers from the shortest prompt and says so
    shortest = render_prompt(tok, d.profile, d.turns[4:5])
    with pytest.raises(ConfigError):
        fit_prompt(tok, d.profile, d.turns[:5], 20)
    fitted = G._fit_from(tok, d.profile, d.turns[:5], 20, 2)
    assert fitted.ids == shortest and fitted.start == 4 and "used them whole" in fitted.note
    fitted = G._fit_from(tok, d.profile, d.turns[:5], 20, 0, hard_limit=50)
    assert fitted.ids == shortest[-50:] and "kept the last 50" in fitted.note


def test_batched_equals_one_at_a_time_greedy(tiny, test_dialogues):
    model, tok, _ = tiny
    opts = dict(max_new_tokens=10, do_sample=False)
    batched = generate_dialogues(model, tok, test_dialogues, GenerationOptions(batch_size=3, **opts), progress=False)
    single = [generate_dialogues(model, tok, [d], GenerationOptions(batch_size=1, reuse_prefix=False, **opts),
                                 progress=False)[0] for d in test_dialogues]
    assert 10 <= batched.stats["generate_calls"] < 30 and batched.stats["prefix_tokens_reused"] > 0
    assert supporter_texts(batched) == supporter_texts(single)
    # the first turn equals plain model.generate on its prompt with the same decoding
    dec = resolve_decoding(model, tok, GenerationOptions(**opts))
    checked = 0
    for d, got in zip(test_dialogues, supporter_texts(batched)[::10]):
        prompt = G._fit_from(tok, d.profile, d.turns[:1], dec.max_prompt_tokens).ids
        with torch.inference_mode():
            raw = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=10, do_sample=False,
                                 eos_token_id=list(dec.stop_ids), pad_token_id=dec.pad_id)
        first = clean_reply(tok.decode(raw[0, len(prompt):].tolist()), G.special_token_strings(tok),
                            echo=d.turns[0].text)
        if first:  # an empty one was regenerated with sampling instead
            assert got == first
            checked += 1
    assert checked >= 1


def test_sampling_is_keyed_by_dialogue_and_turn(tiny, test_dialogues):
    model, tok, _ = tiny
    run = lambda bs, seed: supporter_texts(generate_dialogues(  # noqa: E731
        model, tok, test_dialogues[:2], GenerationOptions(max_new_tokens=5, do_sample=True, temperature=1.0,
                                                          batch_size=bs, seed=seed), progress=False))
    a = run(3, 1)
    assert a == run(1, 1)  # batch composition does not change a sampled reply
    assert a != run(3, 2)


def test_empty_reply_is_regenerated_with_sampling(tiny, test_dialogues):
    model, tok, _ = tiny
    import copy

    mute = copy.deepcopy(model)
    with torch.no_grad():
        mute.model.norm.weight.zero_()  # all logits equal: greedy picks id 0, the end token
    assert tok.convert_ids_to_tokens(0) == tok.eos_token
    out = generate_dialogues(mute, tok, test_dialogues[:1], GenerationOptions(max_new_tokens=4), progress=False)
    texts = supporter_texts(out)
    assert all(texts) and FALLBACK_REPLY not in texts
    assert [(p.dialogue_id, p.turn, p.code) for p in out.problems] == \
        [("9001", t, "regenerated") for t in range(1, 20, 2)]


def test_reply_empty_twice_gets_the_fallback_and_is_reported(tiny, test_dialogues, monkeypatch):
    model, tok, _ = tiny
    calls = []

    def empty(model_, tokenizer, reqs, dec, specials, attempt, store=None):
        calls.append(attempt)
        return ["" for _ in reqs]

    monkeypatch.setattr(G, "_replies", empty)
    out = generate_dialogues(model, tok, test_dialogues[1:2], GenerationOptions(max_new_tokens=4), progress=False)
    assert supporter_texts(out) == [FALLBACK_REPLY] * 10
    assert sorted(set(calls)) == [0, 1]
    assert [(p.dialogue_id, p.turn, p.code) for p in out.problems] == [("9002", t, "fallback") for t in range(1, 20, 2)]
    assert "dialogue 9002, turn 1 [fallback]" in str(out.problems[0])


def test_input_errors_name_dialogue_and_turn(tiny, test_dialogues):
    model, tok, _ = tiny
    with pytest.raises(DataError, match="9001"):
        generate_dialogues(model, tok, [test_dialogues[0], test_dialogues[0]], progress=False)
    with pytest.raises(DataError, match="dialogue 9001, turn 1"):
        generate_dialogues(model, tok, test_dialogues[:1], use_gold_history=True, progress=False)
    out = generate_dialogues(model, tok, test_dialogues[:1], GenerationOptions(max_prompt_tokens=16, max_new_tokens=3),
                             progress=False)
    assert all(supporter_texts(out))
    assert [(p.dialogue_id, p.turn) for p in out.problems if p.code == "long_prompt"] == \
        [("9001", t) for t in range(1, 20, 2)]


# ------------------------------------------------------------------------------------------------
# resuming

def test_interrupted_run_resumes_to_the_same_result(tiny, test_dialogues, tmp_path):
    model, tok, _ = tiny
    opts = GenerationOptions(max_new_tokens=5, batch_size=2)
    full = generate_dialogues(model, tok, test_dialogues, opts, progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(n_done):
        if n_done >= 12:
            raise Killed

    ckpt = tmp_path / "progress.json"
    with pytest.raises(Killed):
        generate_dialogues(model, tok, test_dialogues, opts, checkpoint_path=ckpt, checkpoint_every=1,
                           progress=False, on_checkpoint=kill_after_two)
    saved = json.loads(ckpt.read_text())
    n_saved = sum(t is not None for v in saved["texts"].values() for t in v)
    assert 0 < n_saved < 30
    resumed = generate_dialogues(model, tok, test_dialogues, opts, checkpoint_path=ckpt, checkpoint_every=1,
                                 progress=False)
    assert resumed.stats["resumed_turns"] == n_saved and resumed.stats["replayed_batches"] > 0
    assert supporter_texts(resumed) == supporter_texts(full)
    # a checkpoint of another run (other options) is ignored, not trusted
    other = generate_dialogues(model, tok, test_dialogues[:1], GenerationOptions(max_new_tokens=3, batch_size=2),
                               checkpoint_path=ckpt, progress=False)
    assert other.stats["resumed_turns"] == 0


_KILLABLE = r"""
import sys, time
import pesc.generation as G
real = G.generate_dialogues
def slow(*a, **k):
    k["on_checkpoint"] = lambda n: (print("CHECKPOINT", n, flush=True), time.sleep(60))
    return real(*a, **k)
G.generate_dialogues = slow
from pesc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_cli_run_restarted_gives_identical_file(tiny, tmp_path):
    from pesc.cli import main

    _, _, model_dir = tiny
    args = ["generate", "--model", str(model_dir), "--input", str(FIX / "small_test.json"), "--max-new-tokens", "5",
            "--batch-size", "2", "--checkpoint-every", "1", "--no-progress"]
    out = tmp_path / "killed.json"
    ckpt = tmp_path / "killed.json.progress.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *args, "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the first checkpoint is on disk
        assert line.startswith("CHECKPOINT"), proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists() and ckpt.exists()
    assert main(args + ["--out", str(out)]) == 0
    assert not ckpt.exists()
    clean = tmp_path / "clean.json"
    assert main(args + ["--out", str(clean)]) == 0
    assert out.read_bytes() == clean.read_bytes()
    task = load_task(out)
    assert all(t.text for d in task.dialogues for t in d.turns)


# ------------------------------------------------------------------------------------------------
# chat

def test_stream_reply_grows_and_ends_with_the_reply(tiny):
    model, tok, _ = tiny
    profile = {"Name": "Ana", "emotion_type": "anxiety", "situation": "new job"}
    history = [Turn(SEEKER, "I start a new job tomorrow and I cannot sleep.")]
    for opts in (GenerationOptions(max_new_tokens=12), GenerationOptions(max_new_tokens=12, do_sample=True, seed=4)):
        parts = list(stream_reply(model, tok, profile, history, opts))
        assert parts and all(parts[i + 1] != parts[i] for i in range(len(parts) - 1))
        assert parts[-1] == generate_reply(model, tok, profile, history, opts)
    with pytest.raises(ConfigError, match="seeker"):
        generate_reply(model, tok, profile, history + [Turn(SUPPORTER, "ok")])


def test_stream_reply_stops_when_the_model_starts_a_new_turn(tiny, monkeypatch):
    model, tok, _ = tiny

    class FakeStreamer:
        def __init__(self, *a, **k):
            self.pieces = iter(["Breathe ", "slowly.", "\nSeeker:", " more", " text"])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.pieces)

        def end(self):
            pass

    import transformers

    monkeypatch.setattr(transformers, "TextIteratorStreamer", FakeStreamer)
    monkeypatch.setattr(model, "generate", lambda **kw: None)
    parts = list(stream_reply(model, tok, {}, [Turn(SEEKER, "hi")]))
    assert parts == ["Breathe", "Breathe slowly."]

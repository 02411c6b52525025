"""The example builder: prompt = profile + history, labels = target + EOS, truncation from the oldest
turns, chat-template and plain rendering."""

import copy

import pytest
import torch

from pesc.data import Dialogue, Turn, profile_block
from pesc.data.examples import (IGNORE_INDEX, build_examples, collate, has_chat_template, render_prompt,
                                render_target)
from pesc.data.samples import load_samples
from pesc.errors import ConfigError

# A small Jinja chat template: every message ends with the tokenizer's EOS, like ChatML models whose
# end-of-turn token is their EOS.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def dialogues():
    return load_samples()


@pytest.fixture(scope="module")
def plain_tok(dialogues):
    from pesc.models.smoke import train_tokenizer

    tok = train_tokenizer(dialogues, vocab_size=800)
    assert not has_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def chat_tok(plain_tok):
    tok = copy.deepcopy(plain_tok)
    tok.chat_template = TEMPLATE
    assert has_chat_template(tok)
    return tok


def split(ex):
    n = ex.labels.count(IGNORE_INDEX)
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert IGNORE_INDEX not in ex.labels[n:]
    return ex.input_ids[:n], ex.labels[n:]


def test_plain_path(dialogues, plain_tok):
    tok = plain_tok
    exs = build_examples(dialogues[:3], tok, max_length=4096)
    assert [(e.dialogue_id, e.turn) for e in exs] == [(d.id, i) for d in dialogues[:3] for i in range(1, 20, 2)]
    for ex in exs:
        d = next(x for x in dialogues if x.id == ex.dialogue_id)
        prompt, target = split(ex)
        assert ex.input_ids[len(prompt):] == target
        reply = d.turns[ex.turn].text
        assert target == tok(" " + reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(target[:-1]).strip() == reply
        text = tok.decode(prompt)
        history = "".join(f"{'Seeker' if t.role == 'seeker' else 'Supporter'}: {t.text}\n"
                          for t in d.turns[: ex.turn])
        assert text == profile_block(d.profile) + "\n\n" + history + "Supporter:"


def test_chat_template_path(dialogues, chat_tok):
    tok = chat_tok
    d = dialogues[4]
    exs = build_examples([d], tok, max_length=4096)
    assert [e.turn for e in exs] == list(range(1, 20, 2))
    for ex in exs:
        prompt, target = split(ex)
        messages = [{"role": "system", "content": profile_block(d.profile)}] + [
            {"role": "user" if t.role == "seeker" else "assistant", "content": t.text}
            for t in d.turns[: ex.turn]]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == tok(rendered, add_special_tokens=False)["input_ids"]
        assert tok.decode(prompt).startswith("<|system|>\nYou are an emotional support companion.")
        assert tok.decode(prompt).endswith(f"<|user|>\n{d.turns[ex.turn - 1].text}<|endoftext|>\n<|assistant|>\n")
        # no leading space after the template's "assistant\n"; the end token is the EOS
        assert target == tok(d.turns[ex.turn].text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(prompt + target) == tok.apply_chat_template(
            messages + [{"role": "assistant", "content": d.turns[ex.turn].text}], tokenize=False).rstrip("\n")


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_truncation_drops_oldest_history(dialogues, plain_tok, chat_tok, which):
    tok = plain_tok if which == "plain" else chat_tok
    d, i = dialogues[2], 19
    target = render_target(tok, d.turns[i].text)
    minimal = render_prompt(tok, d.profile, d.turns[i - 1: i])
    full = render_prompt(tok, d.profile, d.turns[:i])
    max_length = len(minimal) + len(target) + 150
    assert len(full) + len(target) > max_length  # truncation is needed
    ex = build_examples([d], tok, max_length=max_length)[-1]
    assert ex.turn == i and len(ex.input_ids) <= max_length
    prompt, labels = split(ex)
    assert labels == target  # the whole reply and its EOS survive
    # the prompt is the history from some seeker turn k on: the longest such suffix that fits
    k = next(k for k in range(0, i, 2) if render_prompt(tok, d.profile, d.turns[k:i]) == prompt)
    assert k > 0
    assert len(render_prompt(tok, d.profile, d.turns[k - 2: i])) + len(target) > max_length
    text = tok.decode(prompt)
    assert profile_block(d.profile) in text
    assert d.turns[i - 1].text in text and d.turns[k].text in text
    assert d.turns[0].text not in text and d.turns[k - 1].text not in text


def test_long_target_is_cut_and_tiny_budget_raises(dialogues, plain_tok):
    tok = plain_tok
    d, i = dialogues[5], 19
    target = render_target(tok, d.turns[i].text)
    minimal = render_prompt(tok, d.profile, d.turns[i - 1: i])
    last = Dialogue(d.id, d.turns[i - 1: i + 1], d.profile)  # one example: the last reply
    (ex,) = build_examples([last], tok, max_length=len(minimal) + 10, min_target_tokens=8)
    prompt, labels = split(ex)
    assert prompt == minimal  # only the profile and the latest seeker turn are left
    assert labels == target[:10] and len(ex.input_ids) == len(minimal) + 10
    with pytest.raises(ConfigError, match=rf"dialogue {d.id}, turn 1: the profile and the latest seeker "
                                          r"turn alone take \d+ tokens.*raise max_length"):
        build_examples([d], tok, max_length=40)


def test_a_turn_that_cannot_fit_is_skipped_with_one_warning_naming_it(dialogues, plain_tok, caplog):
    tok = plain_tok
    d = dialogues[2]
    long_turn = Turn("seeker", " ".join([d.turns[0].text] * 30))
    crowded = Dialogue(d.id + "-long", [long_turn, d.turns[1]], d.profile)
    n_ok = len(build_examples([d], tok, max_length=512))
    with caplog.at_level("WARNING", logger="pesc.data.examples"):
        examples = build_examples([d, crowded], tok, max_length=512)
    assert len(examples) == n_ok and all(e.dialogue_id == d.id for e in examples)
    (record,) = [r for r in caplog.records if "skipped" in r.getMessage()]
    msg = record.getMessage()
    assert f"1 of {n_ok + 1} supporter turns skipped" in msg and f"dialogue {crowded.id}, turn 1" in msg


def test_blank_and_leading_supporter_turns_make_no_example(dialogues, plain_tok):
    d = dialogues[0]
    blank = d.with_supporter_texts([""] * 10)  # like test.json
    assert build_examples([blank], plain_tok, max_length=2048) == []
    texts = [t.text for t in d.turns if t.role == "supporter"]
    texts[3] = "  "
    part = d.with_supporter_texts(texts)
    assert [e.turn for e in build_examples([part], plain_tok, max_length=4096)] == [1, 3, 5, 9, 11, 13, 15, 17, 19]
    opening = Dialogue("x", [Turn("supporter", "Hello, how can I help?"), Turn("seeker", "I feel low."),
                             Turn("supporter", "I'm sorry you feel low.")], {"Name": "Kim"}, "esconv")
    (ex,) = build_examples([opening], plain_tok, max_length=512)
    assert ex.turn == 2
    assert "Supporter: Hello, how can I help?\nSeeker: I feel low.\nSupporter:" in plain_tok.decode(split(ex)[0])


def test_collate(dialogues, plain_tok):
    exs = build_examples(dialogues[:1], plain_tok, max_length=4096)[:3]
    pad = plain_tok.pad_token_id
    batch = collate(exs, pad)
    lengths = [len(e.input_ids) for e in exs]
    n = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, n)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for r, e in enumerate(exs):
        assert batch["input_ids"][r, : lengths[r]].tolist() == e.input_ids
        assert batch["labels"][r, : lengths[r]].tolist() == e.labels
        assert (batch["input_ids"][r, lengths[r]:] == pad).all()
        assert (batch["labels"][r, lengths[r]:] == IGNORE_INDEX).all()
    as_dicts = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in exs], pad)
    assert all(torch.equal(as_dicts[k], batch[k]) for k in batch)

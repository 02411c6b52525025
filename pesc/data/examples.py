"""Turn dialogues into supervised examples: prompt (profile + history) -> one supporter turn.

The same prompt renderer is used for training, teacher-student KL and generation, so what a model
is trained on is exactly what it sees at inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pesc.data.dialogue import SEEKER, SUPPORTER, Dialogue, Turn, profile_block
from pesc.errors import ConfigError

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)
PLAIN_ROLE_NAMES = {SEEKER: "Seeker", SUPPORTER: "Supporter"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_token_id(tokenizer) -> int:
    """The token that ends a supporter turn (the chat template's end-of-turn is the EOS here)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; set one before training")
    return int(tokenizer.eos_token_id)


def render_prompt(tokenizer, profile: dict, history: list[Turn]) -> list[int]:
    """Token ids of the prompt that asks for the next supporter turn after `history`."""
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": profile_block(profile)}]
        messages += [{"role": "user" if t.role == SEEKER else "assistant", "content": t.text}
                     for t in history]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = profile_block(profile) + "\n\n"
    text += "".join(f"{PLAIN_ROLE_NAMES[t.role]}: {t.text}\n" for t in history)
    text += f"{PLAIN_ROLE_NAMES[SUPPORTER]}:"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def render_target(tokenizer, text: str) -> list[int]:
    """Target ids: the reply followed by the end-of-turn token."""
    prefix = "" if has_chat_template(tokenizer) else " "
    return tokenizer(prefix + text, add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]


def fit_prompt(tokenizer, profile: dict, history: list[Turn], budget: int, *, where: str = "") -> list[int]:
    """The prompt with the oldest history dropped (in seeker/supporter pairs) until it fits `budget`.

    The profile and the latest seeker turn always survive; if even they do not fit, raise.
    """
    start = 0
    while True:
        ids = render_prompt(tokenizer, profile, history[start:])
        if len(ids) <= budget:
            return ids
        if len(history) - start <= 1:
            raise ConfigError(f"{where}the profile and the latest seeker turn alone take {len(ids)} "
                              f"tokens, more than the budget of {budget}; raise max_length")
        start += 2 if len(history) - start > 2 else 1


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    dialogue_id: str
    turn: int  # index of the target supporter turn in the dialogue


def build_examples(dialogues: list[Dialogue], tokenizer, max_length: int = 1024,
                   min_target_tokens: int = 8) -> list[Example]:
    """One example per supporter turn that follows at least one seeker turn.

    Labels cover the target tokens and the end token only. History is truncated from the oldest
    turns so the profile and the latest seeker turn survive; a target that alone would overflow is
    cut at the end (keeping at least `min_target_tokens`). A turn whose profile and latest seeker
    turn alone leave no room for `min_target_tokens` is skipped and counted in one warning (naming
    the first such dialogue and turn); if every turn is skipped, ConfigError.
    """
    out, skipped = [], []
    for d in dialogues:
        seen_seeker = False
        for i, turn in enumerate(d.turns):
            if turn.role == SEEKER:
                seen_seeker = True
                continue
            if not seen_seeker or not turn.text.strip():
                continue
            target = render_target(tokenizer, turn.text)
            where = f"dialogue {d.id}, turn {i}: "
            # Keep the whole target when possible (dropping old history for it); only when even
            # the profile and the latest seeker turn leave no room is the target cut at the end.
            try:
                prompt = fit_prompt(tokenizer, d.profile, d.turns[:i], max_length - len(target),
                                    where=where)
            except ConfigError:
                try:
                    prompt = fit_prompt(tokenizer, d.profile, d.turns[:i],
                                        max_length - max(min_target_tokens, 1), where=where)
                except ConfigError as e:
                    skipped.append(str(e))
                    continue
            target = target[: max_length - len(prompt)]
            out.append(Example(prompt + target, [IGNORE_INDEX] * len(prompt) + target, d.id, i))
    if skipped and not out:
        raise ConfigError(f"no example fits max_length {max_length}: {skipped[0]}")
    if skipped:
        logger.warning("%d of %d supporter turns skipped, their profile and latest seeker turn leave no room "
                       "for a reply within max_length %d (first: %s)", len(skipped), len(skipped) + len(out),
                       max_length, skipped[0])
    return out


def collate(examples: list[Example] | list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for teacher forcing: input_ids, attention_mask, labels."""
    rows = [(e.input_ids, e.labels) if isinstance(e, Example) else (e["input_ids"], e["labels"])
            for e in examples]
    n = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

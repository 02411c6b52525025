"""The `smoke` preset's models: a byte-level BPE tokenizer trained on the dialogues and tiny
random-initialised Llama-family teacher and student. Everything builds in seconds, offline."""

from __future__ import annotations

from pathlib import Path

import torch

from pesc.data.dialogue import Dialogue, profile_block

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(dialogues: list[Dialogue], vocab_size: int = 2048):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the dialogues' text and profiles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)

    def texts():
        for d in dialogues:
            yield profile_block(d.profile)
            for t in d.turns:
                yield f"Seeker: {t.text}" if t.role == "seeker" else f"Supporter: {t.text}"

    tok.train_from_iterator(texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=4096)


def tiny_config(vocab_size: int, layers: int, hidden: int = 64, heads: int = 4, seed: int = 0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=1)


def tiny_model(vocab_size: int, layers: int, hidden: int = 64, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size, layers, hidden))


def build_smoke_models(dialogues: list[Dialogue], out_dir: str | Path, teacher_layers: int = 4,
                       student_layers: int = 2, hidden: int = 64, vocab_size: int = 2048,
                       seed: int = 0) -> tuple[Path, Path]:
    """Write an untrained teacher and student (sharing one tokenizer) under out_dir."""
    out = Path(out_dir)
    tok = train_tokenizer(dialogues, vocab_size)
    paths = []
    for name, layers, s in (("teacher-init", teacher_layers, seed), ("student-init", student_layers, seed + 1)):
        model = tiny_model(len(tok), layers, hidden, s)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        p = out / name
        model.save_pretrained(p)
        tok.save_pretrained(p)
        paths.append(p)
    return paths[0], paths[1]

"""The teacher cache: the teacher's top-k log-probabilities at every target position, on disk.

`pesc cache-teacher` runs the teacher once over the training (and validation) examples. For each
supporter-reply position it stores the k most likely next-token ids, their log-probabilities at the
distillation temperature tau (softmax(z / tau)) and log(1 - their total probability), the log of the
mass left to the rest of the vocabulary. That mass cannot be re-tempered later, so a cache serves
one temperature; the losses refuse a cache written at another. Distillation then reads these rows instead of running the teacher, through the same
`TeacherSignal` seam the losses already use (`topk_ids`, `topk_logprobs`, `rest_logmass`).

Layout (a directory):

    manifest.json              format, version, teacher, vocab size, k, temperature, per split: examples,
                               positions, sha256 of the examples, shard list
    teacher_embeddings.safetensors   the teacher's input embeddings (for embedding-cost losses)
    <split>/index.npy          int64 (examples, 3): shard, first row, rows
    <split>/ids-00000.npy      int32 (rows, k)     memory-mapped when read
    <split>/logprobs-00000.npy float32 (rows, k)
    <split>/rest-00000.npy     float32 (rows,)

Rows of an example are its target positions in order; an example never straddles two shards.
The sha256 covers every example's token ids and labels (so the data, the tokenizer, the prompt
format and max_length): a cache built from other data is refused, never silently misaligned.
The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pesc.data.examples import IGNORE_INDEX, Example, collate
from pesc.errors import ConfigError

FORMAT = "pesc-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "teacher_embeddings.safetensors"


def examples_fingerprint(examples: list[Example]) -> str:
    """sha256 over the token ids and labels of every example, in order."""
    h = hashlib.sha256()
    h.update(f"{len(examples)}\n".encode())
    for e in examples:
        ids = np.asarray(e.input_ids, dtype=np.int64)
        lab = np.asarray(e.labels, dtype=np.int64)
        h.update(np.int64(len(ids)).tobytes())
        h.update(ids.tobytes())
        h.update(lab.tobytes())
    return h.hexdigest()


def target_counts(examples: list[Example]) -> np.ndarray:
    """Number of target positions of each example (labels[1:] != -100)."""
    return np.array([int((np.asarray(e.labels[1:]) != IGNORE_INDEX).sum()) for e in examples], dtype=np.int64)


def plan_shards(counts: np.ndarray, shard_positions: int) -> np.ndarray:
    """index (n, 3): shard, first row within the shard, rows; examples never straddle shards."""
    index = np.zeros((len(counts), 3), dtype=np.int64)
    shard, row = 0, 0
    for i, c in enumerate(counts):
        if row > 0 and row + c > shard_positions:
            shard, row = shard + 1, 0
        index[i] = (shard, row, c)
        row += c
    return index


def topk_rows(logits: torch.Tensor, k: int, vocab_size: int | None = None, temperature: float = 1.0):
    """(ids int64 (N, k), log-probs float32 (N, k), log of leftover mass float32 (N,)) of softmax(z / tau).

    The leftover is the log-sum-exp of the log-probabilities outside the top k (exact, no
    cancellation even when the top k hold almost all the mass).
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, logp.shape[-1])
    vals, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, vals, rest


def _model_fingerprint(teacher_name: str) -> dict:
    p = Path(teacher_name)
    info = {"teacher": str(teacher_name)}
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.exists():
            info["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        info["weights"] = {f.name: f.stat().st_size for f in sorted(p.glob("*.safetensors"))}
    return info


def build_teacher_cache(teacher, splits: dict[str, list[Example]], out_dir: str | Path, *, topk: int = 64,
                        temperature: float = 1.0, vocab_size: int | None = None, pad_id: int = 0, batch_size: int = 8,
                        shard_positions: int = 500_000, teacher_name: str = "", progress: bool = True,
                        overwrite: bool = False) -> Path:
    """Run `teacher` over each split's examples and write the cache directory `out_dir`."""
    from safetensors.torch import save_file

    from pesc.training.trainer import head_only_at, target_positions

    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise ConfigError(f"{out} already exists; remove it or pass --overwrite to rebuild the cache")
    if topk < 1:
        raise ConfigError(f"cache_topk must be >= 1, got {topk}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    teacher.eval()
    device = next(teacher.parameters()).device
    width = vocab_size or teacher.get_output_embeddings().weight.shape[0]
    k = min(topk, width)
    cfg = getattr(teacher, "config", None)
    manifest = {"format": FORMAT, "version": VERSION, "topk": k, "vocab_size": int(width),
                "temperature": float(temperature),
                "teacher_hidden_size": getattr(cfg, "hidden_size", None),
                "teacher_layers": getattr(cfg, "num_hidden_layers", None), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **_model_fingerprint(teacher_name), "splits": {}}
    total = sum(len(v) for v in splits.values())
    bar = tqdm(total=total, desc="teacher cache", unit="ex", disable=not progress)
    for name, examples in splits.items():
        if not examples:
            continue
        d = tmp / name
        d.mkdir()
        counts = target_counts(examples)
        if (counts == 0).any():
            bad = int(np.flatnonzero(counts == 0)[0])
            raise ConfigError(f"example {bad} of split {name!r} (dialogue {examples[bad].dialogue_id}, turn "
                              f"{examples[bad].turn}) has no target tokens")
        index = plan_shards(counts, shard_positions)
        np.save(d / "index.npy", index)
        n_shards = int(index[:, 0].max()) + 1
        rows_per_shard = np.bincount(index[:, 0], weights=index[:, 2], minlength=n_shards).astype(np.int64)
        fmt = np.lib.format
        arrays = [(fmt.open_memmap(d / f"ids-{s:05d}.npy", mode="w+", dtype=np.int32, shape=(int(r), k)),
                   fmt.open_memmap(d / f"logprobs-{s:05d}.npy", mode="w+", dtype=np.float32, shape=(int(r), k)),
                   fmt.open_memmap(d / f"rest-{s:05d}.npy", mode="w+", dtype=np.float32, shape=(int(r),)))
                  for s, r in enumerate(rows_per_shard)]
        order = np.argsort([len(e.input_ids) for e in examples], kind="stable")  # batches of similar length
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                sel = order[b: b + batch_size].tolist()
                batch = {k_: v.to(device) for k_, v in collate([examples[i] for i in sel], pad_id).items()}
                positions = target_positions(batch["labels"])
                with head_only_at(teacher, positions) as packed:
                    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits = logits[0] if packed else logits[positions]
                ids, vals, rest = topk_rows(logits, k, width, temperature)
                ids, vals, rest = ids.cpu().numpy(), vals.cpu().numpy(), rest.cpu().numpy()
                start = 0
                for i in sel:  # rows of the packed batch are example by example, in batch order
                    s, r0, c = (int(x) for x in index[i])
                    ids_a, lp_a, rest_a = arrays[s]
                    ids_a[r0: r0 + c] = ids[start: start + c]
                    lp_a[r0: r0 + c] = vals[start: start + c]
                    rest_a[r0: r0 + c] = rest[start: start + c]
                    start += c
                bar.update(len(sel))
        for group in arrays:
            for a in group:
                a.flush()
        del arrays
        manifest["splits"][name] = {"examples": len(examples), "positions": int(counts.sum()),
                                    "sha256": examples_fingerprint(examples), "shards": n_shards}
    bar.close()
    emb = teacher.get_input_embeddings().weight.detach().to("cpu").contiguous()
    save_file({"weight": emb}, str(tmp / EMBEDDINGS))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class CacheSplit:
    """One split of a cache, memory-mapped."""

    def __init__(self, root: Path, name: str, info: dict):
        d = root / name
        self.name, self.info = name, info
        self.index = np.load(d / "index.npy")
        n = int(info["shards"])
        self.ids = [np.load(d / f"ids-{s:05d}.npy", mmap_mode="r") for s in range(n)]
        self.logprobs = [np.load(d / f"logprobs-{s:05d}.npy", mmap_mode="r") for s in range(n)]
        self.rest = [np.load(d / f"rest-{s:05d}.npy", mmap_mode="r") for s in range(n)]

    def __len__(self):
        return len(self.index)

    def rows(self, example_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Concatenated rows of the given examples, in order, and each example's row count."""
        example_ids = np.asarray(example_ids, dtype=np.int64)
        if example_ids.size and (example_ids.min() < 0 or example_ids.max() >= len(self.index)):
            raise ConfigError(f"teacher cache split {self.name!r} has {len(self.index)} examples; "
                              f"asked for example {int(example_ids.max())}")
        parts_i, parts_l, parts_r = [], [], []
        for i in example_ids:
            s, r0, c = (int(x) for x in self.index[i])
            parts_i.append(self.ids[s][r0: r0 + c])
            parts_l.append(self.logprobs[s][r0: r0 + c])
            parts_r.append(self.rest[s][r0: r0 + c])
        return (np.concatenate(parts_i), np.concatenate(parts_l), np.concatenate(parts_r),
                self.index[example_ids, 2])


class TeacherCache:
    """A cache directory opened for reading. `fetch` returns torch tensors for a batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = " (a build was interrupted: run pesc cache-teacher again)" if partial.exists() else ""
            raise ConfigError(f"{self.path} is not a teacher cache: no {MANIFEST}{hint}")
        try:
            self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{mpath}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ConfigError(f"{self.path}: not a version-{VERSION} pesc teacher cache; rebuild it")
        self.topk = int(self.manifest["topk"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.temperature = float(self.manifest["temperature"])
        self._splits: dict[str, CacheSplit] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> CacheSplit:
        if name not in self.manifest["splits"]:
            raise ConfigError(f"teacher cache {self.path} has no {name!r} split (has: "
                              f"{', '.join(self.split_names) or 'none'}); rebuild it with pesc cache-teacher")
        if name not in self._splits:
            self._splits[name] = CacheSplit(self.path, name, self.manifest["splits"][name])
        return self._splits[name]

    def check(self, name: str, examples: list[Example], vocab_size: int | None = None) -> None:
        """Refuse a cache built from other examples (data, tokenizer, prompt format or max_length)."""
        info = self.manifest["splits"].get(name)
        if info is None:
            self.split(name)  # raises the clear message
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ConfigError(f"teacher cache {self.path} was built for a vocabulary of {self.vocab_size} tokens, "
                              f"the student's tokenizer has {vocab_size}")
        digest = examples_fingerprint(examples)
        if digest != info["sha256"]:
            raise ConfigError(
                f"teacher cache {self.path} was built from different {name} data ({info['examples']} examples, "
                f"sha256 {info['sha256'][:12]}) than this run's ({len(examples)} examples, sha256 {digest[:12]}): "
                "the data, tokenizer, prompt format or max_length changed. Rebuild it with pesc cache-teacher")

    def fetch(self, split_ids: torch.Tensor, example_ids: torch.Tensor, counts: torch.Tensor | None = None,
              device=None):
        """Top-k rows of a batch, packed example by example: ids (N, k) int64, logprobs (N, k), rest (N,)."""
        names = {v: k for k, v in _split_ids().items()}
        sids = split_ids.tolist()
        if len(set(sids)) != 1:
            raise ValueError("a batch mixes teacher-cache splits")
        ids, lp, rest, n = self.split(names[sids[0]]).rows(example_ids.cpu().numpy())
        if counts is not None and not np.array_equal(n, counts.cpu().numpy()):
            raise ConfigError(f"teacher cache {self.path} does not match this batch's target positions; "
                              "rebuild it with pesc cache-teacher")
        out = (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(lp)),
               torch.from_numpy(np.ascontiguousarray(rest)))
        return tuple(t.to(device) for t in out) if device is not None else out

    def input_embeddings(self) -> torch.Tensor | None:
        p = self.path / EMBEDDINGS
        if not p.exists():
            return None
        from safetensors.torch import load_file

        return load_file(str(p))["weight"]


def _split_ids() -> dict[str, int]:
    from pesc.training.trainer import SPLIT_IDS

    return SPLIT_IDS


def sparse_kl(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor,
              temperature: float = 1.0, vocab_size: int | None = None) -> torch.Tensor:
    """Per-position KL(p_T || q_S) with the vocabulary grouped into the k cached tokens + one rest bin.

    By the data-processing inequality this is a lower bound of the full KL (exact when the teacher's
    top k hold all its mass). `temperature` must be the cache's: the student is softened by it and
    compared with the cached (already tempered) teacher. float32, shapes (N, V), (N, k), (N, k), (N,).
    """
    s = student_logits.float()
    if vocab_size is not None:
        s = s[..., :vocab_size]
    lq = torch.log_softmax(s / temperature, -1)
    lq_k = lq.gather(-1, ids)
    lq_rest = lq.scatter(-1, ids, float("-inf")).logsumexp(-1)
    tp = torch.cat([logprobs.float(), rest.float().unsqueeze(-1)], -1)
    sq = torch.cat([lq_k, lq_rest.unsqueeze(-1)], -1)
    p = tp.exp()
    return (p * (tp - sq)).nan_to_num(0.0).sum(-1)

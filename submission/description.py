"""The submission's DESCRIPTION.md, generated from a plain dict.

Known keys (all optional), in the order they are written:

- `title` (str), `summary` (str)
- `model` (str: path or Hub id), `base_model`, `teacher` (str)
- `loss` (str, or {"name": ..., other params}), `hyperparameters` (dict), `training_data` (str/list)
- `generation` (dict of decoding options), `generation_problems` (list of str)
- `validation` (dict metric -> number, plus optional "mode"/"note"), `validation_note` (str)
- `check` (str: the pre-flight check summary)
- `commands` (list of shell commands that reproduce the submission)
- `code` (dict: commit, dirty, files)
- `notes` (str or list)

Any other key is written as its own section.
"""

from __future__ import annotations

import json

ORDER = ("summary", "model", "base_model", "teacher", "loss", "hyperparameters", "training_data",
         "generation", "generation_problems", "validation", "validation_note", "check", "commands",
         "code", "notes")
TITLES = {"summary": "Summary", "model": "Model", "base_model": "Base model", "teacher": "Teacher",
          "loss": "Loss", "hyperparameters": "Hyperparameters", "training_data": "Training data",
          "generation": "Generation", "generation_problems": "Generation problems",
          "validation": "Validation scores", "validation_note": "Validation", "check": "Pre-flight check",
          "commands": "Commands to reproduce", "code": "Code", "notes": "Notes"}


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, ensure_ascii=False) + "`"
    return str(v)


def _table(d: dict) -> list[str]:
    lines = ["| name | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt_value(v).replace('|', '/')} |" for k, v in d.items()]
    return lines


def _section(key: str, value) -> list[str]:
    title = TITLES.get(key, key.replace("_", " ").capitalize())
    out = [f"## {title}", ""]
    if key == "commands":
        cmds = [value] if isinstance(value, str) else list(value)
        out += ["```bash", *cmds, "```"]
    elif key == "loss" and isinstance(value, dict):
        name = value.get("name", "?")
        params = {k: v for k, v in value.items() if k != "name"}
        out.append(f"`{name}`" + (" with " + ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
                                   if params else ""))
    elif key == "validation" and isinstance(value, dict):
        meta = {k: value[k] for k in ("mode", "note", "file") if k in value}
        scores = {k: v for k, v in value.items() if k not in meta}
        if "mode" in meta:
            out += [f"Mode: {meta['mode']}", ""]
        if "file" in meta:
            out += [f"Scored file: `{meta['file']}`", ""]
        if scores:
            out += _table(scores)
        if "note" in meta:
            out += ["", str(meta["note"])]
    elif isinstance(value, dict):
        out += _table(value) if value else ["(none)"]
    elif isinstance(value, (list, tuple)):
        out += [f"- {_fmt_value(v)}" for v in value] if value else ["(none)"]
    else:
        out.append(_fmt_value(value))
    return out + [""]


def write_description(description: dict) -> str:
    """Markdown text for DESCRIPTION.md. Empty values are left out; unknown keys get a section."""
    desc = {k: v for k, v in (description or {}).items() if v not in (None, "", [], {})}
    lines = [f"# {desc.pop('title', 'PESC submission')}", ""]
    lines.append("NLPCC 2025 shared task 8, Personalized Emotional Support Conversation. `result.json` is "
                 "`test.json` with every supporter turn filled; `code/` holds the project's source.")
    lines.append("")
    for key in ORDER:
        if key in desc:
            lines += _section(key, desc.pop(key))
    for key, value in desc.items():
        lines += _section(key, value)
    return "\n".join(lines).rstrip() + "\n"

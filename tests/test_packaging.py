"""Packaging: every package directory of the four source folders is listed in pyproject's explicit `packages`
(a missing one installs editable but not for a user), and a real (non-editable) install adds one top-level name,
`dllm`, under which `dllm.decoding`, `dllm.cache` and `dllm.eval` import."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sys

try:
    import tomllib
except ImportError:              # Python 3.10
    import tomli as tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "build", "dist", "runs", ".pytest_cache", "__pycache__"}


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_directory_is_listed():
    config = _setuptools()
    found = set()
    for name, folder in config["package-dir"].items():
        root = REPO / folder
        found |= {".".join([name, *init.parent.relative_to(root).parts]) for init in root.rglob("__init__.py")}
    assert found == set(config["packages"])


def test_a_real_install_adds_only_dllm(tmp_path):
    source, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(REPO, source, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []   # else fetch setuptools
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline, "--target",
                        str(site), str(source)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    top = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top == {"dllm"}
    probe = ("import dllm.decoding, dllm.cache, dllm.eval.tasks, dllm.zoo; "
             "print(dllm.__file__); print(dllm.zoo.bundled_path('tiny-llada'))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    module, zoo = r.stdout.split()
    assert module.startswith(str(site)) and pathlib.Path(zoo, "model.safetensors").is_file()

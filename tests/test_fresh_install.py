"""The README's main command on a fresh machine: a new virtual environment with the base install only.

No test extra and no system site-packages, so a runtime import that ``pyproject.toml`` does not
declare fails here (pip's local cache keeps the install fast). The model cache is fresh too, so
the first run's download of the embedded model is part of the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, pkgutil, tsedge
names = [m.name for m in pkgutil.walk_packages(tsedge.__path__, "tsedge.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run outside the checkout, so ``import tsedge`` means the installed package."""
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_base_install_runs_main_command(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TSEDGE_CACHE=str(tmp_path / "cache"), PATH=f"{env_dir / 'bin'}:{env['PATH']}")
    _run([python, "-m", "pip", "install", "-q", str(REPO)], env, tmp_path)
    modules = _run([python, "-c", IMPORT_ALL], env, tmp_path)
    assert int(modules.stdout.strip()) > 10
    result = _run([str(env_dir / "bin" / "tsedge"), "generate", "--model", "smollm2-135m", "--target", "llvm",
                   "--prompt", "What is the capital of France?", "--max-new-tokens", "4",
                   "--temperature", "0", "--json"], env, tmp_path)
    out = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert out["generated_tokens"] == 4 and out["prompt_tokens"] > 8
    assert out["text"].strip() and out["target"] == "llvm" and out["policy"] == "dense"
    assert "Traceback" not in result.stderr and "pip" not in result.stderr.lower()
    assert "Warning" not in result.stderr  # no TVM internals

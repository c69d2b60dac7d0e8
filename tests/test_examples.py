"""examples/app.py: an app on the TVM runtime alone streams the same reply as the engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_chat import tiny_folder, tiny_lib  # noqa: F401 (fixtures: a tiny model, 64-token cache)

from tsedge.engine import Engine
from tsedge.sampling import SamplingParams

APP = Path(__file__).resolve().parents[1] / "examples" / "app.py"
RUN = """
import runpy, sys
sys.argv = ["app.py", *sys.argv[1:]]
runpy.run_path({app!r}, run_name="__main__")
maps = open("/proc/self/maps").read()
print("runtime only" if "libtvm_runtime" in maps and "libtvm_compiler" not in maps else "compiler loaded",
      file=sys.stderr)
"""


def test_app_runs_on_the_runtime_alone_and_matches_the_engine(tiny_folder, tiny_lib):
    question = "Hi there."
    engine = Engine(tiny_lib, str(tiny_folder))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    expected = engine.generate(prompt, max_new_tokens=128, sampling=SamplingParams(temperature=0.0))
    text = engine.tokenizer.decode(expected.tokens, skip_special_tokens=True)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-c", RUN.format(app=str(APP)), str(tiny_lib), str(tiny_folder),
                             question], capture_output=True, env=env, timeout=600)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout.decode() == text + "\n"  # bytes: a random tiny model's text may hold a \r
    assert stderr.splitlines()[-1] == "runtime only"
    assert f"[{len(expected.tokens)} tokens, " in stderr

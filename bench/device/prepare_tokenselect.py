"""Libraries for the TokenSelect GPU run (passkey, agreement): SmolLM2-135M, cuda:sm_90a, float16.

Writes ``.carry/libs2/NAME.so|json`` for the names in ``LIBS``.
"""

from __future__ import annotations

from pathlib import Path

from tsedge.compile.build import compile_library
from tsedge.compile.targets import parse_target
from tsedge.models.config import PolicyConfig
from tsedge.weights import load_source

LONG = 65536 + 1024

PAPER = {"n_init": 128, "n_local": 512, "top_k": 2048, "chunk_size": 512}  # TokenSelect paper
SMALL = {"n_init": 32, "n_local": 256, "top_k": 512, "chunk_size": 256}  # the 32/512/256

LIBS = {
    "dense": (PolicyConfig(), LONG),
    "tokenselect": (PolicyConfig("tokenselect", **PAPER), LONG),
    "tokenselect-pool6": (PolicyConfig("tokenselect", **PAPER, pool_kernel=6), LONG),  # ref. passkey
    "tokenselect-32-512-256": (PolicyConfig("tokenselect", **SMALL), LONG),
    "tokenselect-32-512-256-pool6": (PolicyConfig("tokenselect", **SMALL, pool_kernel=6), LONG),
    "tokenselect-small": (PolicyConfig("tokenselect", n_init=32, n_local=128, top_k=512, chunk_size=128),
                          8192 + 512),  # agreement budgets 32/128/512
}


def main() -> None:
    cfg = load_source("smollm2-135m").config
    for name, (policy, context) in LIBS.items():
        compile_library(cfg, policy, parse_target("cuda:sm_90a"), "float16", context,
                        Path(".carry/libs2") / f"{name}.so")


if __name__ == "__main__":
    main()

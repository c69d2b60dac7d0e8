"""Passkey task: prompt construction with the real SmolLM2 tokenizer, one short cell end to end."""

from __future__ import annotations

import json

import pytest

from tsedge.engine import Engine
from tsedge.eval.passkey import (FILLER_SENTENCES, KEY_SENTENCE, QUESTION, build_prompt,
                                 format_table, run_passkey)


@pytest.mark.parametrize("length", [600, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_length_and_depth(smol_source, length, depth):
    tok = smol_source.tokenizer
    ids = build_prompt(tok, length, depth, 31415)
    longest_sentence = max(len(tok.encode(" " + s)) for s in FILLER_SENTENCES)
    assert length - longest_sentence <= len(ids) <= length
    text = tok.decode(ids)
    assert text.startswith(tok.apply_chat_template([{"role": "user", "content": ""}])[:30])
    assert text.endswith(f"\n\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    key = KEY_SENTENCE.format(key=31415)
    assert text.count(key) == 1
    before, after = text.split(key)
    count = sum(before.count(s) for s in FILLER_SENTENCES)
    total = count + sum(after.count(s) for s in FILLER_SENTENCES)
    assert abs(count - depth * total) <= 0.5


def test_prompt_rejects_too_short_length(smol_source):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        build_prompt(smol_source.tokenizer, 20, 0.5, 12345)


def test_short_cell_end_to_end(smol_lib, smol_source):
    """Dense SmolLM2 finds the key in a ~600-token prompt."""
    engine = Engine(smol_lib, smol_source)
    seen = []
    result = run_passkey(engine, [600], [0.5], keys_per_cell=3, seed=0, progress=seen.append)
    (cell,) = result["cells"]
    assert seen == [cell]
    assert all(590 <= a["prompt_tokens"] <= 600 for a in cell["answers"])
    assert cell["score"] >= 2 / 3, cell["answers"]
    assert result["config"]["policy"]["name"] == "dense"
    json.dumps(result)
    table = format_table(result)
    assert "| 50% | " in table and "600" in table
    print(table)

"""Chat prompt ids equal transformers' ``apply_chat_template(..., tokenize=True)``.

transformers 5.x tokenizes the rendered template with ``add_special_tokens=False``: the only BOS is
one the template writes, whatever the tokenizer's post-processor would add. Covered for the
embedded SmolLM2 GGUF, tiny tokenizers built here (BOS from the post-processor, with and without
``{{ bos_token }}`` in the template) and every tokenizer in ``../shared/cases`` when present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from tiny_model import CHATML, make_tiny_hf_model
from transformers import AutoTokenizer

from tsedge.fetch import default_model_path
from tsedge.tokenizer import Tokenizer

CASES = Path(__file__).resolve().parents[1] / ".." / "shared" / "cases"
SHARED = sorted(p.parent.name for p in CASES.glob("*/tokenizer.json"))
CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本 🤖"}],
    [{"role": "user", "content": "def add(a, b):\n    return a + b"},
     {"role": "assistant", "content": "It adds.\n\nDone."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because."}, {"role": "user", "content": "ok"}],
]


def _tiny(directory: Path, bos_in_template: bool) -> tuple[Tokenizer, Any]:
    """A tiny byte-level tokenizer whose post-processor adds BOS (as Llama 3)."""
    folder = make_tiny_hf_model(directory)
    if bos_in_template:  # like ../shared/cases/bos_template
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps(config | {"chat_template": "{{ bos_token }}" + CHATML}))
    return _folder(folder)


def _folder(folder: Path) -> tuple[Tokenizer, Any]:
    ours = Tokenizer.from_file(folder / "tokenizer.json", folder / "tokenizer_config.json")
    return ours, AutoTokenizer.from_pretrained(folder)


def _smollm2() -> tuple[Tokenizer, Any]:
    path = default_model_path()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf(gguf.GGUFReader(path)), theirs


@pytest.fixture(scope="module", params=["smollm2-gguf", "tiny", "tiny-bos-template",
                                        *(f"shared-{name}" for name in SHARED)])
def tokenizers(request, tmp_path_factory) -> tuple[Tokenizer, Any]:
    """(tsedge's, transformers') tokenizer of one model."""
    name = request.param
    if name == "smollm2-gguf":
        return _smollm2()
    if name.startswith("shared-"):
        return _folder(CASES / name.removeprefix("shared-"))
    return _tiny(tmp_path_factory.mktemp(name), bos_in_template=name == "tiny-bos-template")


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=lambda m: f"{len(m)}-messages")
def test_chat_ids_equal_transformers(tokenizers, messages, generation_prompt):
    ours, theirs = tokenizers
    expected = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                          tokenize=True, return_dict=False)
    assert ours.encode_chat(messages, generation_prompt) == expected


def test_template_bos_is_not_doubled(tmp_path):
    """The bos_template case: post-processor BOS + ``{{ bos_token }}`` gives one BOS, not two."""
    ours, _ = _tiny(tmp_path, bos_in_template=True)
    ids = ours.encode_chat(CONVERSATIONS[0])
    assert ids[:2] == [ours.bos_token_id, ours.backend.token_to_id("<|im_start|>")]
    assert ids.count(ours.bos_token_id) == 1
    assert ours.encode("Hello")[0] == ours.bos_token_id  # plain text still gets the model's BOS


def test_none_valued_keys_are_dropped(tmp_path):
    """As transformers' _normalize_chat_messages: ``"content": None`` is rendered as absent."""
    ours, _ = _tiny(tmp_path, bos_in_template=False)
    ours.chat_template = "{% for m in messages %}{{ m.get('content', '-') }}{% endfor %}"
    assert ours.apply_chat_template([{"role": "assistant", "content": None}]) == "-"

"""tsedge.tokenizer against transformers: GGUF and Hugging Face tokenizers, chat, streaming."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from tiny_model import make_tiny_hf_model, write_gguf
from transformers import AutoTokenizer

from tsedge.fetch import default_model_path
from tsedge.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; pi is 3.14159265 and 1,000,000 > 999.",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n-1) + fib(n-2)  # O(2^n)\n",
    "héllo wörld, naïve café — 日本語のテキスト, 한국어, Ελληνικά, emoji 🤖🎉👩‍👩‍👧",
    "   leading spaces, trailing   \n\n\n  multiple\t\ttabs  \r\n  ",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they've said we'll go; DON'T SHOUT. <|endoftext|>tail",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本"}],
]


@pytest.fixture(scope="module")
def smollm() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(smollm) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(smollm))


@pytest.fixture(scope="module")
def theirs(smollm):
    return AutoTokenizer.from_pretrained(smollm.parent, gguf_file=smollm.name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


def test_gguf_ids_equal_transformers(ours, theirs):
    assert not ours.add_bos and ours.bos_token_id == 1
    assert ours.eos_token_ids[0] == theirs.eos_token_id == 2  # <|im_end|>
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text


def test_smollm_digits_split_first(ours, theirs):
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) isolates digits
    before the GPT-2 regex; transformers' GGUF loader skips that step, so whitespace before a
    digit differs: "  1" is [ĠĠ, 1] for the model, [Ġ, Ġ, 1] in transformers."""
    for text, expected in [("x  12", ["x", "ĠĠ", "1", "2"]), ("a\r\n3", ["a", "čĊ", "3"])]:
        assert [ours.backend.id_to_token(i) for i in ours.encode(text)] == expected
        assert ours.encode(text) != theirs.encode(text)


def test_decode_roundtrip(ours):
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_equals_transformers(ours, theirs, messages):
    for generation_prompt in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, generation_prompt) == expected


def test_stream_decoder_keeps_characters_whole(ours):
    text = TEXTS[3] + " " + TEXTS[2]
    ids = ours.encode(text)
    stream = ours.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids) == text
    assert "" in pieces  # some characters span several tokens and were held back
    assert not any("\ufffd" in p for p in pieces)


def test_save_and_reload(ours, tmp_path):
    ours.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
    assert (again.bos_token_id, again.eos_token_ids, again.add_bos, again.chat_template) == (
        ours.bos_token_id, ours.eos_token_ids, ours.add_bos, ours.chat_template)


def test_hf_folder_tokenizer_equals_transformers(tiny):
    ours = Tokenizer.from_file(tiny / "tokenizer.json", tiny / "tokenizer_config.json")
    theirs = AutoTokenizer.from_pretrained(tiny)
    assert ours.add_bos and ours.bos_token_id == 0  # from the post-processor
    assert ours.eos_token_ids == [2, 0]
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_unsupported_gguf_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))
    path = write_gguf(tmp_path / "pre.gguf", {"tokenizer.ggml.model": "gpt2",
                                              "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(TokenizerError, match="unsupported GGUF pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))


def test_chat_template_raise_exception(ours):
    strict = Tokenizer(ours.backend, bos_token_id=1, eos_token_id=2, add_bos=False,
                       chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(Exception, match="roles must alternate"):
        strict.apply_chat_template(CHATS[0])

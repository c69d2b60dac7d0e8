"""Tokenizer: a `tokenizers.Tokenizer` plus the special ids, BOS rule and chat template of a model.

Built from a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``) or from the
metadata of a GGUF file (byte-level BPE, as llama.cpp and transformers read it).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

# Tokens that end an assistant turn, besides the declared EOS (chat formats of supported models).
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:
    # llama.cpp "smollm": every digit alone, then the GPT-2 regex (as SmolLM2's tokenizer.json).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# GGUF `tokenizer.ggml.pre` -> byte-level pre-tokenizer (the regex llama.cpp applies before BPE).
PRE_TOKENIZERS = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "smollm": _smollm,
    "llama3": lambda: _split(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split(_LLAMA3_SPLIT),
    "llama-bpe": lambda: _split(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _split(_LLAMA3_SPLIT),
    "qwen2": lambda: _split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _split(_QWEN2_SPLIT),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class TokenizerError(ValueError):
    """The tokenizer files or metadata cannot be used."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    moved = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, chat_template: str | None) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        ends = [eos_token_id] + [backend.token_to_id(t) for t in END_TOKENS]
        self.eos_token_ids = list(dict.fromkeys(i for i in ends if i is not None))
        self.eos_token_id = eos_token_id

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None
                  ) -> "Tokenizer":
        """Load a Hugging Face ``tokenizer.json`` (and optionally its ``tokenizer_config.json``).

        The chat template comes from the config or, if absent there, ``chat_template.jinja``
        next to ``tokenizer.json``. BOS follows ``add_bos_token``, or else the post-processor.
        """
        tokenizer_json = Path(tokenizer_json)
        try:
            backend = Backend.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {tokenizer_json}: {e}") from e
        cfg = json.loads(Path(tokenizer_config).read_text()) if tokenizer_config else {}

        def token_id(key: str) -> int | None:
            text = _token_text(cfg.get(key))
            return None if text is None else backend.token_to_id(text)

        bos, eos = token_id("bos_token"), token_id("eos_token")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # let the post-processor tell (e.g. Llama 3's TemplateProcessing)
            ids = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and ids[:1] == [bos]
        template = cfg.get("chat_template")
        jinja_file = tokenizer_json.parent / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        tok = cls(backend, bos_token_id=bos, eos_token_id=eos, add_bos=bool(add_bos),
                  chat_template=template)
        if "eos_token_ids" in cfg:
            tok.eos_token_ids = list(cfg["eos_token_ids"])
        return tok

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> "Tokenizer":
        """Build the byte-level BPE tokenizer a GGUF file describes (``tokenizer.ggml.*``)."""
        kind = _field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"unsupported GGUF tokenizer model {kind!r}: tsedge reads byte-level BPE ('gpt2') "
                "vocabularies; convert the model from its Hugging Face folder instead"
            )
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(
                f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}"
            )
        tokens = _field(reader, "tokenizer.ggml.tokens")
        types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {
            t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab, merges))
        backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        # Control tokens are special (never split); ones spelled outside the byte alphabet are
        # llama.cpp mislabels and skipped, as transformers does. User-defined ones match whole.
        backend.add_special_tokens([
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet
        ])
        backend.add_tokens([
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab
        ])
        return cls(
            backend,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            chat_template=_field(reader, "tokenizer.chat_template"),
        )

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and a small ``tokenizer_config.json`` for ``from_file``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        cfg = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_token_ids": self.eos_token_ids,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # ---- text <-> ids -------------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens in it matched), as transformers' ``encode``:
        BOS first if ``add_special_tokens`` and the model adds it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does
        (message keys whose value is None dropped first, as its ``_normalize_chat_messages``)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; use plain generation")
        return _compile_template(self.chat_template).render(
            messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a conversation: the rendered template tokenized without added special
        tokens, so the only BOS is one the template writes (transformers 5.x
        ``apply_chat_template(tokenize=True)`` passes ``add_special_tokens=False``)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class StreamDecoder:
    """Turn ids arriving one by one into printable text, never splitting a UTF-8 character.

    Each ``push`` decodes a short window of recent ids and returns only the new, complete text;
    the concatenation of all pushes and ``flush`` equals ``Tokenizer.decode`` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text was already emitted up to _read
        self._read = 0

    def _text(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        done = self._text(self._prefix, self._read)
        text = self._text(self._prefix)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self._text(self._prefix, self._read)
        text = self._text(self._prefix)
        self._prefix = self._read = len(self._ids)
        return text[len(done):]

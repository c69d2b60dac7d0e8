"""Chat on a tiny random model with a 64-token KV cache: turns dropped to fit, replies cut at a
full cache, the REPL's commands, and a conversation piped into ``tsedge chat`` that outgrows it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_model import make_tiny_hf_model

from tsedge.chat import ChatSession
from tsedge.cli_chat import _prompt as real_prompt
from tsedge.cli import main
from tsedge.engine import ContextOverflowError, Engine
from tsedge.weights import load_source

CAPACITY = 64


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama folder; made once per session (test modules import this fixture)."""
    folder = tmp_path_factory.getbasetemp() / "tiny-chat-model"
    return folder if folder.exists() else make_tiny_hf_model(folder)


@pytest.fixture(scope="session")
def tiny_lib(tiny_folder) -> Path:
    """Its dense CPU library with a 64-token KV cache, compiled once per session by the CLI."""
    lib = tiny_folder.parent / f"tiny-chat-{CAPACITY}.so"
    if not lib.exists():
        result = CliRunner().invoke(main, ["compile", "--model", str(tiny_folder), "--target", "llvm",
                                           "--dtype", "float32", "--max-context", str(CAPACITY),
                                           "-o", str(lib)])
        assert result.exit_code == 0, result.output
    return lib


@pytest.fixture
def tiny_engine(tiny_folder, tiny_lib) -> Engine:
    return Engine(tiny_lib, load_source(str(tiny_folder)))


@pytest.fixture(autouse=True)
def terminal_prompt(monkeypatch):
    """Chat as at a terminal (``>>> `` before each line), so the tests can split the replies."""
    monkeypatch.setattr("tsedge.cli_chat._prompt", lambda: ">>> ")


def chat(tiny_folder, tiny_lib, lines: list[str], *options: str):
    args = ["chat", "--model", str(tiny_folder), "--lib", str(tiny_lib), "--max-new-tokens", "8",
            "--temperature", "0", *options]
    return CliRunner().invoke(main, args, input="".join(f"{line}\n" for line in lines),
                              catch_exceptions=False)


def test_piped_chat_outgrows_the_cache_and_answers_every_line(tiny_folder, tiny_lib):
    lines = ["Hi there.", "What is two plus two?", "And three plus three?", "/reset", "Say hi.", "/exit"]
    result = chat(tiny_folder, tiny_lib, lines)
    assert result.exit_code == 0, result.output
    assert result.stdout.count(">>> ") == len(lines)  # every line was read
    cut = "[reply cut at --max-new-tokens 8; raise it for longer replies]"
    assert [n for n in result.stderr.splitlines()[1:] if n != cut] == [
        "[dropped the 1 oldest turn to fit the KV cache of 64 tokens]",  # before line 2
        "[dropped the 1 oldest turn to fit the KV cache of 64 tokens]",  # before line 3
        "[conversation cleared]",
    ]
    replies = result.stdout.split(">>> ")[1:]
    assert all(reply.endswith("\n") for reply in replies[:3] + replies[4:5])  # 4 answers


def test_chat_commands(tiny_folder, tiny_lib):
    result = chat(tiny_folder, tiny_lib, ["/stats", "/help", "Hi there.", "/stats", "/nope", LONG,
                                          "/stats"], "--system", "Be brief.")
    assert result.exit_code == 0, result.output
    notes = [n for n in result.stderr.splitlines()[1:] if not n.startswith("[reply cut at")]
    assert notes[0] == "[no reply yet]"
    assert notes[1:6] == [
        "/help   list these commands",
        "/stats  prompt tokens, time to first token, prefill and decode speed of the last reply",
        "/reset  start a new conversation (keeps --system)",
        "/exit   quit",
        "Ctrl-C stops a reply; Ctrl-D quits too",
    ]
    tokenizer = load_source(str(tiny_folder)).tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."}]
    prompt = len(tokenizer.encode_chat(messages))
    assert notes[6].startswith(f"prompt tokens: {prompt} ({prompt} prefilled, 0 reused from the KV "
                               "cache), TTFT: ")
    assert "prefill: " in notes[6] and "decode: " in notes[6]
    assert notes[7] == "[unknown command /nope; /help lists the commands]"
    assert notes[8] == f"[{too_long(tokenizer, 'Be brief.')}]"
    assert notes[9] == notes[6]  # the conversation is as it was before the long message


def test_a_reply_cut_by_max_new_tokens_says_so(tiny_folder, tiny_lib):
    result = chat(tiny_folder, tiny_lib, ["Hi there."], "--max-new-tokens", "2")
    assert result.stderr.splitlines()[1:] == ["[reply cut at --max-new-tokens 2; raise it for longer replies]"]


def test_turns_are_dropped_oldest_first_and_the_system_prompt_stays(tiny_engine):
    session = ChatSession(tiny_engine, max_new_tokens=8, system="Be brief.")
    assert session.send("Hi there.").dropped_turns == 0
    reply = session.send("What is two plus two?")
    assert reply.dropped_turns == 1
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[1]["content"] == "What is two plus two?"
    assert reply.result.prompt_tokens + 8 <= CAPACITY


LONG = "The quick brown fox jumps over the lazy dog. " * 4


def too_long(tokenizer, system: str | None = None) -> str:
    """ChatSession's error for LONG."""
    messages = [{"role": "system", "content": system}] if system else []
    tokens = len(tokenizer.encode_chat(messages + [{"role": "user", "content": LONG}]))
    with_system = " with the system prompt" if system else ""
    return (f"this message{with_system} takes {tokens} tokens, more than the KV cache of 64 tokens "
            "holds; send a shorter one or restart chat with a larger --max-context")


def test_message_longer_than_the_cache_keeps_the_conversation(tiny_engine):
    session = ChatSession(tiny_engine, max_new_tokens=8)
    session.send("Hi there.")
    before = session.messages
    with pytest.raises(ContextOverflowError) as err:
        session.send(LONG)
    assert str(err.value) == too_long(tiny_engine.tokenizer)
    assert session.messages == before


def test_reply_stops_cleanly_at_a_full_cache(tiny_engine):
    session = ChatSession(tiny_engine, max_new_tokens=100)
    prompt = len(tiny_engine.tokenizer.encode_chat([{"role": "user", "content": "Hi there."}]))
    result = session.send("Hi there.").result
    assert result.stopped == "context_full"
    assert len(result.tokens) == CAPACITY - prompt + 1  # the last token never enters the cache
    assert len(tiny_engine.cache) == CAPACITY


def test_piped_chat_prints_no_prompts(tiny_folder, tiny_lib, monkeypatch):
    monkeypatch.setattr("tsedge.cli_chat._prompt", real_prompt)  # CliRunner's stdin is not a terminal
    result = chat(tiny_folder, tiny_lib, ["Hi there.", "/exit"])
    assert result.exit_code == 0 and ">>> " not in result.stdout and result.stdout.endswith("\n")

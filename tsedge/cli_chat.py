"""The ``tsedge chat`` loop: read a line, answer it or run a /command; never dies on a full cache."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from tsedge.chat import ChatSession, Reply
from tsedge.cli_options import PrefillDisplay, context_full_note
from tsedge.engine import ContextOverflowError


def _note(text: str) -> None:
    click.echo(text, err=True)


def _help(_session: ChatSession) -> None:
    for name, text in HELP.items():
        _note(f"{name:7s} {text}")
    _note("Ctrl-C stops a reply; Ctrl-D quits too")


def _stats(session: ChatSession) -> None:
    if session.last is None:
        _note("[no reply yet]")
        return
    r = session.last.result
    _note(f"prompt tokens: {r.prompt_tokens} ({r.prompt_tokens - r.reused_tokens} prefilled, "
          f"{r.reused_tokens} reused from the KV cache), TTFT: {r.ttft_s:.3f} s, "
          f"prefill: {r.prefill_tok_per_s:.1f} tok/s, decode: {r.decode_tok_per_s:.1f} tok/s "
          f"({len(r.tokens)} tokens)")


def _reset(session: ChatSession) -> None:
    session.reset()
    _note("[conversation cleared]")


HELP = {
    "/help": "list these commands",
    "/stats": "prompt tokens, time to first token, prefill and decode speed of the last reply",
    "/reset": "start a new conversation (keeps --system)",
    "/exit": "quit",
}
ACTIONS: dict[str, Callable[[ChatSession], None]] = {"/help": _help, "/stats": _stats, "/reset": _reset}


def _prompt() -> str:
    """``>>> `` before each line typed at a terminal; nothing when lines come from a pipe, so a
    script reading stdout gets the replies alone."""
    return ">>> " if sys.stdin.isatty() else ""


def _read() -> str | None:
    """The next line, or None at the end of the input."""
    while True:
        try:
            return input(_prompt())
        except (EOFError, KeyboardInterrupt):
            if _prompt():  # end the prompt's line on a terminal
                click.echo()
            return None
        except UnicodeDecodeError as err:
            _note(f"[that line is not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                  "set a UTF-8 terminal encoding]")


def _dropped_note(reply: Reply, capacity: int) -> str:
    turns = "turn" if reply.dropped_turns == 1 else "turns"
    return f"[dropped the {reply.dropped_turns} oldest {turns} to fit the KV cache of {capacity} tokens]"


def _answer(session: ChatSession, line: str) -> None:
    """One turn: stream the reply, then say what was dropped or cut to fit the KV cache."""
    capacity = session.engine.cache.capacity
    with PrefillDisplay(session.engine.prefill_chunk) as progress:
        try:
            reply = session.send(line, lambda text: click.echo(text, nl=False), progress)
        except ContextOverflowError as err:
            _note(f"[{err}]")
            return
        except KeyboardInterrupt:
            session.interrupted()
            click.echo()
            _note("[stopped]")
            return
    click.echo()
    if reply.dropped_turns:
        _note(_dropped_note(reply, capacity))
    if reply.result.stopped == "context_full":
        _note(context_full_note(capacity))
    elif reply.result.stopped == "length":
        _note(f"[reply cut at --max-new-tokens {session.max_new_tokens}; raise it for longer replies]")


def repl(session: ChatSession) -> None:
    """Answer lines from stdin until /exit or the end of the input."""
    _note("tsedge chat — /help lists the commands, Ctrl-C stops a reply, /exit quits")
    while (line := _read()) is not None:
        command = line.strip()
        if command == "/exit":
            return
        if command in ACTIONS:
            ACTIONS[command](session)
        elif command.startswith("/") and " " not in command:
            _note(f"[unknown command {command}; /help lists the commands]")
        elif command:
            _answer(session, line)

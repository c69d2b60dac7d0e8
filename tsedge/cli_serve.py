"""``tsedge serve``: the OpenAI-compatible server and chat page for one model library."""

from __future__ import annotations

import contextlib
import socket

import click

from tsedge.cli_options import (TARGET_HELP, cache_correction_option, policy_options, quantization_option,
                                 sampling_options)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port), or one error line naming the fix."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port, "
                         "or --host 127.0.0.1") from None


def _quiet_server_class():
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn's server, stopped by Ctrl-C or SIGTERM without raising the signal again once it has
        shut down (uvicorn does, for its caller; the cancelled lifespan task then prints a traceback)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    return QuietServer


def _serve(model: str, target: str | None, lib: str | None, host: str, port: int, kw: dict) -> None:
    import uvicorn

    from tsedge.cli import _checked_target, _engine
    from tsedge.cli_options import sampling_params
    from tsedge.serve import create_app
    from tsedge.weights import load_source

    target = _checked_target(target, lib, kw)
    sock = _listen(host, port)  # before loading: a taken port fails at once
    source = load_source(model)
    engine = _engine(source, target, lib, kw, runtime_only=True)
    app = create_app(engine, source.config.name, sampling_params(source.path, kw), aliases=(model,))
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    shards = f", {engine.meta.tensor_parallel} shards" if engine.meta.tensor_parallel > 1 else ""
    click.echo(f"tsedge serve: {source.config.name} ({engine.meta.policy.name}, {engine.meta.target}, "
               f"context {engine.cache.capacity}{shards}) at {url} — chat page {url}/, OpenAI API {url}/v1", err=True)
    server = _quiet_server_class()(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    click.echo("tsedge serve: stopped", err=True)


@click.command()
@click.option("--model", default=None, help="preset name, .gguf or HF folder (default: the embedded model)")
@click.option("--target", default=None, help=TARGET_HELP)
@click.option("--lib", type=click.Path(dir_okay=False), default=None, help="use this compiled library")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface; the API has no authentication)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free one, printed at start)")
@sampling_options
@policy_options
@cache_correction_option
@quantization_option(None)
def serve(model: str | None, target: str | None, lib: str | None, host: str, port: int, **kw) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics, and a chat page at /. Requests run one at a time in arrival order; sampling
    options set the defaults of fields a request leaves out."""
    from tsedge.cli import DEFAULT_MODEL, _errors

    _errors(_serve)(model or DEFAULT_MODEL, target, lib, host, port, kw)

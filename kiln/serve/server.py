"""Run the HTTP server: uvicorn in this process, the inference worker in a child process.

Signals are ours, not uvicorn's: SIGTERM (or Ctrl-C) starts a drain (`ServerState.begin_drain`); a
second one forces the exit. The process exits 0 after a drain, 1 if the worker died or never
loaded, and leaves no child behind either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

from kiln.serve.app import create_app
from kiln.serve.state import ServeConfig, ServerState

log = logging.getLogger("kiln.serve")

FORCE_EXIT_AFTER_S = 5.0  # after we ask uvicorn to stop: most time it may take to close connections


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # run_server installs its own handlers on the event loop


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("kiln")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


async def run_server(cfg: ServeConfig, host: str, port: int, access_log: bool = True) -> int:
    state = ServerState(cfg)
    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log,
                            timeout_graceful_shutdown=FORCE_EXIT_AFTER_S, lifespan="on",
                            server_header=False, date_header=True)
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def request_exit() -> None:
        server.should_exit = True

    def on_signal() -> None:
        if server.should_exit or state.phase.value == "draining":
            server.force_exit = True
            server.should_exit = True
            return
        state.begin_drain()

    state.request_exit = request_exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await state.close()  # normally done by the lifespan already; makes sure the worker is gone
    if not server.started and state.exit_code == 0:
        return 1  # could not bind the port, or the app failed to start
    return state.exit_code


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> int:
    _configure_logging()
    return asyncio.run(run_server(cfg, host, port, access_log))

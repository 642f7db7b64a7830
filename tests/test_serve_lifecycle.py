"""Process lifecycle: loading, worker death, SIGTERM drain (within and past its timeout)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import MODEL, ServerProcess, children
from test_serve_errors import assert_error


def _stream_body(max_tokens: int, i: int = 0) -> dict:
    return {"model": MODEL, "prompt": f"Story number {i}: once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}


class Stream(threading.Thread):
    """Reads one SSE stream in a thread; records chunks, finish reasons, error events, [DONE]."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.first = threading.Event()
        self.chunks, self.finish, self.errors, self.done, self.exc = 0, [], [], False, None

    def run(self):
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                assert r.status_code == 200, r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            self.errors.append(obj["error"])
                        else:
                            self.chunks += 1
                            self.finish += [c["finish_reason"] for c in obj["choices"] if c["finish_reason"]]
                            self.first.set()
        except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
            self.exc = e
        finally:
            self.first.set()


def test_ready_is_503_while_loading_then_200(default_engine):
    srv = ServerProcess(default_engine)
    try:
        saw_loading = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(srv.url + "/ready", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            if r.status_code == 503:
                saw_loading = True
                assert_error(r, 503)
                assert httpx.get(srv.url + "/health").status_code == 200
                c = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
                if c.status_code == 503:
                    assert c.json()["error"]["code"] in ("loading", None) and c.headers["retry-after"]
            elif r.status_code == 200:
                break
            time.sleep(0.02)
        assert saw_loading and r.status_code == 200
        assert srv.stop() == 0
    finally:
        srv.close()


def test_worker_killed_mid_stream(default_engine):
    srv = ServerProcess(default_engine)
    try:
        srv.wait_ready()
        pid = srv.proc.pid
        (worker,) = children(pid)
        s = Stream(srv.url, _stream_body(400))
        s.start()
        assert s.first.wait(60) and s.exc is None
        result = {}
        plain = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            srv.url + "/v1/completions", json={**_stream_body(400), "stream": False}, timeout=60)))
        plain.start()
        time.sleep(0.3)
        t_kill = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        s.join(30)
        plain.join(30)
        assert s.errors and s.errors[0]["code"] == "worker_died" and not s.done, (s.errors, s.exc)
        assert_error(result["r"], 500, None, "worker")
        r = httpx.get(srv.url + "/ready", timeout=2)
        assert r.status_code == 503
        code = srv.proc.wait(10)
        assert code != 0 and time.monotonic() - t_kill < 10
        assert children(pid) == []
    finally:
        srv.close()


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c-to-the-group"])
def test_sigterm_lets_open_streams_finish(default_engine, how):
    srv = ServerProcess(default_engine)
    try:
        srv.wait_ready()
        pid = srv.proc.pid
        streams = [Stream(srv.url, _stream_body(40, i)) for i in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(60)
        if how == "sigterm":
            srv.proc.send_signal(signal.SIGTERM)
        else:  # the terminal sends SIGINT to every process of the group, the worker too
            os.killpg(pid, signal.SIGINT)
        time.sleep(0.2)
        assert httpx.get(srv.url + "/ready", timeout=5).status_code == 503
        late = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=5)
        assert_error(late, 503, None, "shutting down")
        for s in streams:
            s.join(60)
        assert all(s.exc is None and s.errors == [] for s in streams)
        assert [s.finish for s in streams] == [["length"]] * 8 and all(s.done for s in streams)
        assert srv.proc.wait(30) == 0
        assert children(pid) == []
    finally:
        srv.close()


def test_sigterm_past_the_timeout_aborts_what_still_runs(default_engine):
    srv = ServerProcess(default_engine, "--shutdown-timeout", "1", "--log-requests")
    try:
        srv.wait_ready()
        marker = "walrus-marker-prompt"
        streams = [Stream(srv.url, {**_stream_body(400, i), "prompt": f"{marker} {i}"}) for i in range(2)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(60)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for s in streams:
            s.join(30)
        assert [s.finish for s in streams] == [["abort"]] * 2 and all(s.done for s in streams), (
            [(s.exc, s.errors, s.chunks) for s in streams], srv.output())
        assert srv.proc.wait(30) == 0 and time.monotonic() - t0 < 10
        assert marker in srv.output()  # --log-requests logs prompts
    finally:
        srv.close()


def test_http_process_does_not_import_torch():
    """The HTTP process never runs the model: it stays torch-free (faster start, less memory)."""
    import subprocess
    import sys

    code = ("import sys; from kiln.cli.main import build_parser; build_parser(); "
            "import kiln.serve.server, kiln.build.default_model; "
            "from kiln.serve.state import ServeConfig, ServerState; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_worker_exits_when_the_http_process_is_killed(default_engine):
    """SIGKILL of the HTTP process mid-generation: the orphaned worker stops and cleans up."""
    srv = ServerProcess(default_engine)
    try:
        srv.wait_ready()
        (worker,) = children(srv.proc.pid)
        ipc_dirs = [p for p in Path(tempfile.gettempdir()).glob("kiln-ipc-*") if _owned_by(p, worker)]
        s = Stream(srv.url, _stream_body(2000))
        s.start()
        assert s.first.wait(60)
        srv.proc.kill()
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its HTTP process"
        assert ipc_dirs and not any(p.exists() for p in ipc_dirs)
    finally:
        srv.close()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _owned_by(ipc_dir: Path, pid: int) -> bool:
    """Whether this socket directory is the one the worker `pid` was started with."""
    try:
        return str(ipc_dir) in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False

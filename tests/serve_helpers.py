"""A real `kiln serve` process on a free loopback port, for the HTTP tests.

`ServerProcess(engine, *args)` starts `python -m kiln.cli.main serve ENGINE --port P ...` with its
output in a log file; `wait_ready()` polls /ready; `stop()` sends SIGTERM and returns the exit
code; `children()` lists its live child processes (read from /proc). `metrics()` parses /metrics.
`serving(engine, *args)` is all of that as a context manager for fixtures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

API_KEY = "kiln-test-key-0123"
MODEL = "SmolLM2-135M-Instruct"
BASE_ARGS = ["--device", "cpu", "--skip-verify", "--kv-cache-memory", "64MiB", "--no-access-log"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """(name, frozenset of (label, value)) -> value, for every sample line of the text format."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        pairs = frozenset(tuple(kv.split("=", 1)) for kv in labels.rstrip("}").split(",") if kv)
        out[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


class Metrics(dict):
    def get_value(self, name: str, **labels: str) -> float | None:
        """The sample of `name` with these labels (model_name defaults to the test model)."""
        labels.setdefault("model_name", MODEL)
        return self.get((name, frozenset(labels.items())))


class ServerProcess:
    def __init__(self, engine: str | Path, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile(prefix="kiln-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "kiln.cli.main", "serve", str(engine), "--port", str(self.port),
               *BASE_ARGS, *args]
        if api_key:
            cmd += ["--api-key", api_key]
        # its own process group, as under a supervisor: tests may signal the whole group
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.started = time.monotonic()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from process start until /ready answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def metrics(self) -> Metrics:
        r = httpx.get(self.url + "/metrics", headers=self.headers, timeout=5.0)
        r.raise_for_status()
        return Metrics(parse_metrics(r.text))

    def engine_idle(self) -> bool:
        m = self.metrics()
        return (m.get_value("kiln:num_requests_running") == 0 and m.get_value("kiln:num_requests_waiting") == 0
                and m.get_value("kiln:kv_cache_free_blocks") == m.get_value("kiln:kv_cache_total_blocks"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            for pid in children(self.proc.pid):
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@contextlib.contextmanager
def serving(engine: str | Path, *args: str, api_key: str | None = None):
    """A ready server; when the block ends normally it must drain on SIGTERM, exit 0 and leave no
    child process behind. It is killed in any case."""
    srv = ServerProcess(engine, *args, api_key=api_key)
    try:
        srv.wait_ready()
        yield srv
        pid = srv.proc.pid
        assert srv.stop() == 0, srv.output()
        assert children(pid) == []
    finally:
        srv.close()

"""A real Prometheus server (Debian's `prometheus`) scrapes the real kiln server every second;
after traffic, a PromQL query for every metric of the issue returns a sample."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import MODEL, free_port

HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
              "request_prompt_tokens", "request_generation_tokens"]
COUNTERS = ["prompt_tokens_total", "generation_tokens_total", "request_success_total",
            "request_rejected_total", "num_preemptions_total", "prefix_cache_queries_total",
            "prefix_cache_hits_total"]
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]


@pytest.fixture(scope="module")
def prometheus(server):
    binary = shutil.which("prometheus")
    assert binary, "the Debian package `prometheus` is missing: scripts/test.sh installs it"
    tmp = Path(tempfile.mkdtemp(prefix="kiln-prom-"))
    target = server.url.removeprefix("http://")
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kiln\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _query(url: str, q: str) -> list:
    r = httpx.get(url + "/api/v1/query", params={"query": q}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_every_metric(server, prometheus):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
                "stream": stream})
            assert r.status_code == 200
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": ""}).status_code == 400
    names = [f"kiln:{h}_bucket" for h in HISTOGRAMS] + [f"kiln:{h}_count" for h in HISTOGRAMS]
    names += [f"kiln:{c}" for c in COUNTERS] + [f"kiln:{g}" for g in GAUGES]
    deadline = time.monotonic() + 20
    missing = names
    while missing and time.monotonic() < deadline:
        time.sleep(0.5)
        missing = [n for n in missing if not _query(prometheus, f'{n}{{model_name="{MODEL}"}}')]
    assert not missing, missing
    # the values are the server's: at least the 2 chats above finished, 1 request was refused
    ok = _query(prometheus, f'sum(kiln:request_success_total{{model_name="{MODEL}"}})')
    assert float(ok[0]["value"][1]) >= 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        bad = _query(prometheus, f'kiln:request_rejected_total{{model_name="{MODEL}",reason="invalid"}}')
        if bad and float(bad[0]["value"][1]) >= 1:
            break
        time.sleep(0.5)
    assert bad and float(bad[0]["value"][1]) >= 1
    up = _query(prometheus, 'up{job="kiln"}')
    assert up and up[0]["value"][1] == "1"

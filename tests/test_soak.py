"""`kiln bench soak` against a real `kiln serve` process, and its request mix and parsers offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

from serve_helpers import API_KEY, ServerProcess

from kiln.bench.soak import P_CANCEL, P_INVALID, draw, is_openai_error, parse_metrics

KILN = [sys.executable, "-m", "kiln.cli.main"]


def test_soak_against_a_server(default_engine, tmp_path):
    srv = ServerProcess(default_engine, api_key=API_KEY)
    try:
        srv.wait_ready()
        out = tmp_path / "soak.json"
        r = subprocess.run(
            [*KILN, "bench", "soak", "--base-url", srv.url, "--minutes", "0.25", "--rate", "4",
             "--max-tokens", "16", "--json", str(out), "--server-pid", str(srv.proc.pid)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "KILN_API_KEY": API_KEY})
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.rstrip().endswith("PASS")
        rep = json.loads(out.read_text())
        c = rep["outcomes"]
        assert rep["requests_sent"] == sum(c.values()) > 30
        assert c["ok"] > 0 and c["cancelled"] > 0 and c["invalid_rejected_as_expected"] > 0
        assert c["unexpected_5xx"] == c["connection_errors"] == c["invalid_not_rejected"] == 0
        start, end = rep["server"]["start"], rep["server"]["end"]
        assert end["idle"] and start["free_blocks"] == end["free_blocks"] == end["total_blocks"]
        assert len(start["pids"]) == 2 and start["rss_mib"] > 0  # the server and its worker
        assert rep["completion_tokens"] > 0 and rep["latency_ok_s"]["p50"] > 0
        assert srv.stop() == 0
    finally:
        srv.close()


def test_bad_options_are_one_line_errors(tmp_path):
    for args in (["--minutes", "0", "--rate", "1"], ["--minutes", "1", "--rate", "-2"],
                 ["--minutes", "1", "--rate", "1", "--max-tokens", "0"],
                 ["--minutes", "1", "--rate", "1", "--json", str(tmp_path / "no" / "x.json")]):
        r = subprocess.run([*KILN, "bench", "soak", "--base-url", "http://127.0.0.1:1", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("kiln: error: --"), r.stderr


def test_request_mix_is_seeded_and_varied():
    reqs = [draw(random.Random(f"7:{i}"), "m", 64) for i in range(2000)]
    assert [q.body for q in reqs[:50]] == [draw(random.Random(f"7:{i}"), "m", 64).body for i in range(50)]
    invalid = Counter(q.invalid for q in reqs if q.invalid)
    assert abs(sum(invalid.values()) / 2000 - P_INVALID) < 0.02 and len(invalid) == 6
    cancelled = [q for q in reqs if q.cancel_events or q.cancel_after]
    assert abs(len(cancelled) / 2000 - P_CANCEL) < 0.03
    assert {q.path for q in reqs} == {"/v1/chat/completions", "/v1/completions"}
    assert {q.stream for q in reqs} == {True, False}
    lengths = [len(json.loads(q.body).get("prompt", "").split()) for q in reqs if not q.invalid]
    assert min(x for x in lengths if x) <= 5 and max(lengths) >= 250


def test_parsers():
    text = ('# HELP kiln:kv_cache_free_blocks x\nkiln:kv_cache_free_blocks{model_name="a b"} 12.0\n'
            'kiln:num_requests_running{model_name="m"} 3 1700000000\nkiln:num_requests_waiting 0\n'
            'kiln:kv_cache_usage_perc{model_name="m"} 0.5\n')
    assert parse_metrics(text) == {"free_blocks": 12, "running": 3, "waiting": 0}
    assert is_openai_error(b'{"error": {"message": "bad", "type": "t", "param": null, "code": null}}')
    assert not is_openai_error(b'{"error": "bad"}') and not is_openai_error(b'{"detail": "x"}')
    assert not is_openai_error(b"<html>")

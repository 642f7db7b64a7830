"""`kiln bench soak`: mixed OpenAI-API traffic against a running server, then a health check.

Requests arrive as a seeded Poisson process. Each is drawn from its own seeded generator, so a
run's mix does not depend on timing: chat or plain completion, streaming or not, a prompt of 3 to
~300 words, max_tokens in 1..max_tokens, temperature 0 or 0.7. About 10% are cancelled by the
client part-way (a stream is closed after a few events; a plain request is abandoned after a short
delay) and about 5% are invalid on purpose, which the server must refuse with a 4xx in OpenAI's
error shape. Before and after the traffic the server's /metrics (free KV blocks, requests running
and waiting) and the resident memory of its process tree are read; once the traffic stops the
server must go idle with as many free KV blocks as it had at the start.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kiln.errors import KilnError

OUTCOMES = ("ok", "cancelled", "invalid_rejected_as_expected", "invalid_not_rejected",
            "overloaded_503", "timeout_408", "unexpected_4xx", "unexpected_5xx",
            "connection_errors", "stream_error_events", "bad_response")
P_INVALID, P_CANCEL = 0.05, 0.10
INVALID = {  # what is wrong on purpose -> the change to a chat (True) or completion body
    "temperature_5": lambda chat: {"temperature": 5},
    "max_tokens_0": lambda chat: {"max_tokens": 0},
    "empty_prompt": lambda chat: {"messages": []} if chat else {"prompt": ""},
    "unknown_model": lambda chat: {"model": "no-such-model"},
    "too_long": lambda chat: {"max_tokens": 10**7},
    "malformed_json": lambda chat: {},  # the JSON text is cut short
}
IDLE_WAIT_S = 10.0
PROGRESS_EVERY_S = 30.0
BOUNDS = {"minutes": (0, 1440), "rate": (0, 1000), "max_tokens": (0, 4096),  # (exclusive, inclusive)
          "concurrency_limit": (0, 4096), "request_timeout": (0, 3600)}
GAUGES = {"kiln:kv_cache_free_blocks": "free_blocks", "kiln:kv_cache_total_blocks": "total_blocks",
          "kiln:num_requests_running": "running", "kiln:num_requests_waiting": "waiting"}
WORDS = ("the a of and to in is it that was for on are with as at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time "
         "has look two more write go see number no way could people my than first water been call "
         "who oil its now find long down day did get come made may part kiln furnace clay glaze").split()


@dataclass
class SoakConfig:
    base_url: str
    minutes: float
    rate: float  # requests per second
    model: str | None = None  # default: the first of GET /v1/models
    api_key: str | None = None
    seed: int = 0
    max_tokens: int = 64
    concurrency_limit: int = 64  # arrivals past this many in flight wait for a slot
    server_pid: int | None = None
    request_timeout: float = 300.0  # client-side; a request past it counts as a connection error

    def check(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise KilnError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        for name, (lo, hi) in BOUNDS.items():
            v = getattr(self, name)
            if not lo < v <= hi:  # also refuses NaN
                raise KilnError(f"--{name.replace('_', '-')} must be more than {lo} and at most {hi}, "
                                f"got {v}")
        if self.server_pid is not None and not Path(f"/proc/{self.server_pid}/status").exists():
            raise KilnError(f"--server-pid {self.server_pid}: no such process")


@dataclass
class Req:
    path: str
    body: bytes
    stream: bool
    invalid: str | None  # what is wrong with it on purpose
    cancel_events: int | None = None  # streaming: close after this many data events
    cancel_after: float | None = None  # not streaming: abandon after this many seconds


def draw(r: random.Random, model: str, max_tokens: int) -> Req:
    chat, stream, u, temp = r.random() < 0.5, r.random() < 0.5, r.random(), r.choice((0.0, 0.7))
    invalid = r.choice(list(INVALID)) if u < P_INVALID else None
    cancel = not invalid and u < P_INVALID + P_CANCEL
    prompt = " ".join(r.choices(WORDS, k=round(math.exp(r.uniform(math.log(3), math.log(300))))))
    body: dict = {"model": model, "temperature": temp,
                  "max_tokens": max_tokens if cancel else r.randint(1, max_tokens)}
    if temp:
        body["seed"] = r.randrange(1 << 31)
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    body.update(INVALID[invalid](chat) if invalid else {})
    raw = json.dumps(body)
    if invalid == "malformed_json":
        raw = raw[: r.randint(1, len(raw) - 1)]  # a cut object is never valid JSON
    req = Req("/v1/chat/completions" if chat else "/v1/completions", raw.encode(), stream, invalid)
    if cancel and stream:
        req.cancel_events = r.randint(1, 4)
    elif cancel:
        req.cancel_after = r.uniform(0.05, 1.0)
    return req


def is_openai_error(body: bytes) -> bool:
    try:
        e = json.loads(body)["error"]
        return {"message", "type", "param", "code"} <= e.keys() and bool(e["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def error_outcome(status: int, body: bytes, invalid: str | None) -> str:
    """The outcome of any answer to an invalid request, or of a non-200 one to a valid request."""
    if status in (408, 503):
        return "timeout_408" if status == 408 else "overloaded_503"
    if status >= 500:
        return "unexpected_5xx"
    if invalid:
        ok = 400 <= status < 500 and is_openai_error(body)
        return "invalid_rejected_as_expected" if ok else "invalid_not_rejected"
    return "unexpected_4xx" if 400 <= status < 500 else "bad_response"


def parse_metrics(text: str) -> dict[str, float]:
    """The GAUGES from Prometheus text, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1:].split()
        else:
            name, *rest = line.split()
        if name in GAUGES and rest:
            out[GAUGES[name]] = out.get(GAUGES[name], 0) + float(rest[0])
    return out


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants, from the ppid field of /proc/*/stat."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text() if d.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if state != "Z":
                kids.setdefault(int(ppid), []).append(int(d.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(kids.get(tree[-1], ()))
    return tree


def rss_kib(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(x.split()[1]) for x in lines if x.startswith("VmRSS:")), 0)


def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[max(0, math.ceil(q * len(xs)) - 1)], 3) if xs else None


def one_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


class Soak:
    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.examples: dict[str, str] = {}  # outcome -> the first such request and answer
        self.latencies: list[float] = []
        self.tokens = self.sent = 0

    async def run(self) -> dict:
        cfg = self.cfg
        async with httpx.AsyncClient(
                base_url=cfg.base_url.rstrip("/"), timeout=httpx.Timeout(cfg.request_timeout, connect=10.0),
                headers={"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {},
                limits=httpx.Limits(max_connections=cfg.concurrency_limit + 2)) as self.client:
            model = await self._prepare()
            start = await self._health()
            if "error" in start:
                raise KilnError(start["error"])
            t0 = time.monotonic()
            await self._traffic(model)
            duration = time.monotonic() - t0
            end = await self._health()
        return self._report(model, duration, start, end)

    async def _prepare(self) -> str:
        """Checks the server is ready, finds the model name, and sends one tiny request (a fresh
        kiln server has no engine gauges in /metrics until its worker has reported once)."""
        c, step = self.client, f"GET {self.cfg.base_url}/ready"
        try:
            (await c.get("/ready", timeout=10.0)).raise_for_status()
            step = "GET /v1/models (pass --model, or --api-key if the server needs one)"
            model = self.cfg.model or (await c.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
            step = "a 1-token warm-up request"
            body = {"model": model, "prompt": "hello", "max_tokens": 1}
            (await c.post("/v1/completions", json=body)).raise_for_status()
            return model
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise KilnError(f"{step} failed: {one_line(e)}") from None

    async def _health(self) -> dict:
        """Waits up to IDLE_WAIT_S for running == waiting == 0, then reads the gauges and RSS."""
        deadline = time.monotonic() + IDLE_WAIT_S
        while True:
            try:
                r = (await self.client.get("/metrics", timeout=10.0)).raise_for_status()
            except httpx.HTTPError as e:
                return {"error": f"GET /metrics failed: {one_line(e)}"}
            m = parse_metrics(r.text)
            missing = [name for name, key in GAUGES.items() if key not in m]
            if missing:
                return {"error": f"/metrics has no {', '.join(missing)}; is this a kiln server?"}
            m = {k: int(v) for k, v in m.items()}
            m["idle"] = m["running"] == 0 and m["waiting"] == 0
            if m["idle"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if self.cfg.server_pid is not None:
            pids = process_tree(self.cfg.server_pid)
            m.update(pids=pids, rss_mib=round(sum(map(rss_kib, pids)) / 1024, 1))
        return m

    async def _traffic(self, model: str) -> None:
        cfg = self.cfg
        arrivals, slots, tasks = random.Random(cfg.seed), asyncio.Semaphore(cfg.concurrency_limit), []
        t0 = at = last_progress = time.monotonic()
        while (at := at + arrivals.expovariate(cfg.rate)) < t0 + cfg.minutes * 60:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            req = draw(random.Random(f"{cfg.seed}:{len(tasks)}"), model, cfg.max_tokens)
            tasks.append(asyncio.create_task(self._one(req, slots)))
            if at - last_progress >= PROGRESS_EVERY_S:
                last_progress = at
                done = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
                print(f"soak: {at - t0:.0f} s, {self.sent} sent: {done}", file=sys.stderr, flush=True)
        await asyncio.gather(*tasks)

    async def _one(self, req: Req, slots: asyncio.Semaphore) -> None:
        async with slots:
            self.sent += 1
            t = time.monotonic()
            try:  # httpx's own timeouts are TransportErrors, not TimeoutError
                outcome, tokens, detail = await asyncio.wait_for(self._send(req), req.cancel_after)
            except TimeoutError:
                outcome, tokens, detail = "cancelled", 0, None
            except (ValueError, KeyError, TypeError, httpx.HTTPError) as e:
                outcome = "connection_errors" if isinstance(e, httpx.TransportError) else "bad_response"
                tokens, detail = 0, f"{type(e).__name__}: {one_line(e)}"
            self.counts[outcome] += 1
            if detail and outcome != "invalid_rejected_as_expected":
                self.examples.setdefault(outcome, f"{req.invalid or 'valid'} {req.path}: {detail}")
            if outcome == "ok":
                self.latencies.append(time.monotonic() - t)
                self.tokens += tokens

    async def _send(self, req: Req) -> tuple[str, int, str | None]:
        """(outcome, completion tokens, what went wrong)"""
        headers = {"content-type": "application/json"}
        async with self.client.stream("POST", req.path, content=req.body, headers=headers) as resp:
            if resp.status_code != 200 or req.invalid:
                body = await resp.aread()
                detail = f"{resp.status_code} {body[:300].decode(errors='replace')}"
                return error_outcome(resp.status_code, body, req.invalid), 0, detail
            if not req.stream:
                return "ok", json.loads(await resp.aread())["usage"]["completion_tokens"], None
            events = tokens = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if (data := line[5:].strip()) == "[DONE]":
                    return "ok", tokens, None
                event = json.loads(data)
                if "error" in event:
                    return "stream_error_events", 0, data[:300]
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                events += 1
                if events == req.cancel_events:
                    return "cancelled", 0, None  # leaving the block closes the connection mid-stream
            return "connection_errors", 0, "the stream ended without data: [DONE]"

    def _report(self, model: str, duration: float, start: dict, end: dict) -> dict:
        cfg = self.cfg
        rep = {"base_url": cfg.base_url, "model": model, "seed": cfg.seed, "minutes": cfg.minutes,
               "rate": cfg.rate, "max_tokens": cfg.max_tokens, "duration_s": round(duration, 2),
               "requests_sent": self.sent, "outcomes": self.counts, "completion_tokens": self.tokens,
               "latency_ok_s": {q: percentile(self.latencies, p) for q, p in (("p50", 0.5), ("p99", 0.99))},
               "server": {"start": start, "end": end}, "examples": self.examples}
        rep["reason"] = verdict(rep)
        rep["passed"] = rep["reason"] is None
        return rep


def verdict(rep: dict) -> str | None:
    """Why the run failed, or None."""
    c, start, end = rep["outcomes"], rep["server"]["start"], rep["server"]["end"]
    for key, what in (("unexpected_5xx", "unexpected 5xx responses"),
                      ("connection_errors", "connection errors or client timeouts"),
                      ("invalid_not_rejected", "invalid requests not refused with an OpenAI-shaped 4xx"),
                      ("bad_response", "unparseable responses")):
        if c[key]:
            return f"{c[key]} {what}"
    if "error" in end:
        return f"after the traffic, {end['error']}"
    for when, m in (("before", start), ("after", end)):
        if not m["idle"]:
            return (f"the server was not idle within {IDLE_WAIT_S:g} s {when} the traffic "
                    f"({m['running']} running, {m['waiting']} waiting)")
    if end["free_blocks"] != start["free_blocks"]:
        return f"{start['free_blocks']} free KV blocks at the start but {end['free_blocks']} at the end"
    return None


def format_report(rep: dict) -> str:
    s, e, lat = rep["server"]["start"], rep["server"]["end"], rep["latency_ok_s"]
    sec = {q: "-" if v is None else f"{v:.3f} s" for q, v in lat.items()}
    lines = [f"soak of {rep['base_url']} ({rep['model']}): {rep['duration_s']} s at {rep['rate']:g} req/s, "
             f"seed {rep['seed']}", f"{'requests sent':<30} {rep['requests_sent']:>8}"]
    lines += [f"  {k:<28} {v:>8}" for k, v in rep["outcomes"].items()]
    lines += [f"{'completion tokens (ok)':<30} {rep['completion_tokens']:>8}",
              f"{'latency of ok p50 / p99':<30} {sec['p50']} / {sec['p99']}",
              f"{'server':<30} {'start':>12} {'end':>12}"]
    e = {**e, "processes": len(e["pids"])} if "pids" in e else e
    s = {**s, "processes": len(s["pids"])} if "pids" in s else s
    lines += [f"  {k.replace('_', ' '):<28} {s.get(k, '-')!s:>12} {e.get(k, '-')!s:>12}"
              for k in ("free_blocks", "total_blocks", "running", "waiting", "rss_mib", "processes")
              if k in s or k in e]
    lines += [f"first {k}: {v}" for k, v in rep["examples"].items()]
    lines.append("PASS" if rep["passed"] else f"FAIL: {rep['reason']}")
    return "\n".join(lines)


def run_soak(cfg: SoakConfig) -> dict:
    cfg.check()
    return asyncio.run(Soak(cfg).run())

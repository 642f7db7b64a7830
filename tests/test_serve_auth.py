"""API key, CORS and logging defaults.

The routes are enumerated from the app itself, so a route added later is covered without editing
this test. The real server checks every route with and without the key; the in-process app (no
worker: auth runs before any route) checks the options that need a server of their own.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from serve_helpers import API_KEY, MODEL
from starlette.routing import Route

from kiln.serve.app import OPEN_PATHS, create_app
from kiln.serve.state import ServeConfig, ServerState


def _app(engine, **kw):
    return create_app(ServerState(ServeConfig(engine_dir=engine, served_model_name=MODEL, **kw)))


def _routes(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        if isinstance(r, Route):
            path = r.path.replace("{model:path}", MODEL)
            out += [(m, path) for m in sorted(r.methods - {"HEAD"})]
    return out


def test_every_route_needs_the_key_except_health_ready_metrics(server, default_engine):
    routes = _routes(_app(default_engine))
    assert len(routes) >= 12 and ("POST", "/v1/chat/completions") in routes
    open_paths = OPEN_PATHS | {"/metrics"}
    good = {"Authorization": f"Bearer {API_KEY}"}
    wrong = [{}, {"Authorization": f"Bearer {API_KEY.upper()}"}, {"Authorization": API_KEY},
             {"Authorization": f"bearer {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"},
             {"Authorization": f"Bearer {API_KEY[:-1]}"}]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path in routes:
            body = {"json": {}} if method == "POST" else {}
            for h in wrong:
                r = c.request(method, path, headers=h, **body)
                if path in open_paths:
                    assert r.status_code != 401, (method, path)
                else:
                    assert r.status_code == 401, (method, path, h, r.status_code)
                    assert r.json()["error"]["code"] == "invalid_api_key"
                    assert r.headers["www-authenticate"] == "Bearer"
            r = c.request(method, path, headers=good, **body)
            assert r.status_code != 401, (method, path)
        for variant in ["//v1/models", "/v1/models/", "/v1/%6dodels", "/v1/models/..", "/V1/models",
                        "/v1/./models", "//health/../v1/models", "/health/", "/ready/x", "/metrics/"]:
            r = c.get(variant)
            assert r.status_code == 401, (variant, r.status_code)
        assert c.get("/v1/%6dodels", headers=good).json()["data"][0]["id"] == MODEL


def test_metrics_auth_and_cors(default_engine):
    async def main():
        plain = httpx.ASGITransport(app=_app(default_engine, api_key="k"))
        guarded = httpx.ASGITransport(app=_app(default_engine, api_key="k", metrics_auth=True))
        cors = httpx.ASGITransport(app=_app(default_engine, cors_origins=["https://app.example"]))
        async with httpx.AsyncClient(transport=plain, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 200
            r = await c.get("/v1/models", headers={"Origin": "https://evil.example"})
            assert r.status_code == 401
            r = await c.get("/health", headers={"Origin": "https://app.example"})
            assert not any(k.startswith("access-control") for k in r.headers)  # no CORS unless asked
        async with httpx.AsyncClient(transport=guarded, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
        async with httpx.AsyncClient(transport=cors, base_url="http://t") as c:
            r = await c.get("/health", headers={"Origin": "https://app.example"})
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            r = await c.get("/health", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
            pre = await c.options("/v1/chat/completions", headers={  # the openai-node client's headers
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,"
                                                  "x-stainless-lang,x-stainless-retry-count"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "https://app.example"

    asyncio.run(main())


def test_prompts_outputs_and_keys_stay_out_of_the_log(server):
    marker = "zebra-quartz-marker"
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": f"Repeat: {marker}"}], "max_tokens": 8})
    assert r.status_code == 200
    text = r.json()["choices"][0]["message"]["content"]
    log = server.output()
    assert marker not in log and API_KEY not in log
    assert not text.strip() or text not in log


@pytest.mark.parametrize("host", ["127.0.0.1"])
def test_binds_loopback_by_default(host):
    from kiln.cli.main import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == host


def test_empty_api_key_is_refused(default_engine):
    import subprocess
    import sys

    for args, env in ((["--api-key", ""], {}), ([], {"KILN_API_KEY": " "})):
        r = subprocess.run([sys.executable, "-m", "kiln.cli.main", "serve", str(default_engine), "--port", "1",
                            *args], capture_output=True, text=True, env={**__import__("os").environ, **env},
                           timeout=60)
        assert r.returncode == 2 and "API key is empty" in r.stderr and "Traceback" not in r.stderr

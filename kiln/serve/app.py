"""The FastAPI application: routes, middleware, error handlers. State lives in `ServerState`."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from kiln.errors import RequestError
from kiln.serve import generation
from kiln.serve.api_errors import error_response, install_handlers
from kiln.quant.recipe import gate_summary
from kiln.serve.api_models import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from kiln.serve.metrics import CONTENT_TYPE
from kiln.serve.middleware import ApiKey, BodyLimit, RequestId
from kiln.serve.request_checks import off_loop
from kiln.serve.state import Phase, ServerState
from kiln.version import __version__

OPEN_PATHS = {"/health", "/ready"}  # never need the API key (nor /metrics, unless --metrics-auth)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="kiln", version=__version__, lifespan=lifespan)
    app.router.redirect_slashes = False  # /v1/models/ is a 404, not a redirect around the auth check
    app.state.kiln = state
    install_handlers(app)
    cfg = state.cfg
    created = int(time.time())

    manifest = state.client.manifest
    engine_card = {"dtype": manifest.dtype_str,
                   "quantization": gate_summary(manifest.quant) or {"recipe": "none"}}

    def model_card() -> dict:
        return {"id": cfg.served_model_name, "object": "model", "created": created, "owned_by": "kiln",
                "root": cfg.served_model_name, "parent": None, "max_model_len": state.max_seq_len,
                **engine_card}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generation.handle(state, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generation.handle(state, body, request, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        generation.check_model(state, model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        generation.check_model(state, body.model)
        tok = state.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            messages = [m.model_dump() for m in body.messages]
            size = sum(len(str(m.get("content") or "")) + 64 for m in messages)
            ids = await off_loop(size, tok.encode_chat, messages, body.add_generation_prompt)
        else:
            ids = await off_loop(len(body.prompt), tok.encode, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        generation.check_model(state, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < state.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {state.vocab_size})",
                               param="tokens")
        text = await off_loop(len(body.tokens) * 4, state.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    @app.get("/health")
    async def health():
        if state.serving_phase() is Phase.DEAD:
            return error_response(503, "the inference worker is not running", None, "dead")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        err = generation.unavailable(state)
        if err is not None:
            raise err
        return {"status": "ready", "model": cfg.served_model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    # Middleware: the last added runs first.
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    exempt = OPEN_PATHS | (set() if cfg.metrics_auth else {"/metrics"})
    app.add_middleware(ApiKey, api_key=cfg.api_key, exempt=exempt)
    if cfg.cors_origins:
        # any request header: the official clients send their own (x-stainless-*, openai-*)
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(RequestId)
    return app


"""Plain ASGI middleware that runs before any route: request ids, the API key, the body-size limit.

Order, outermost first: RequestId (so every response, errors included, carries `x-request-id`),
CORS (only when origins are configured), ApiKey, BodyLimit, then the app.
"""

from __future__ import annotations

import hmac
import logging
import uuid

from kiln.serve.api_errors import error_bytes

log = logging.getLogger("kiln.serve")

_MAX_CLIENT_ID = 128


async def _send_error(send, status: int, message: str, param: str | None = None,
                      code: str | None = None, extra_headers: list | None = None) -> None:
    body = error_bytes(status, message, param, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def _valid_client_id(v: bytes) -> bool:
    return 0 < len(v) <= _MAX_CLIENT_ID and all(0x21 <= c <= 0x7E for c in v)


class RequestId:
    """Echo the client's `x-request-id` (if it is short printable ASCII) or make one; store it in
    scope["state"]["request_id"] for handlers and logs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        rid = given if given is not None and _valid_client_id(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # a bug somewhere inside: one logged trace, a clean 500 for the client
            log.exception("unexpected error on %s %s (x-request-id %s)", scope.get("method"),
                          scope.get("path"), rid.decode())
            if not started:
                await _send_error(send_with_id, 500, "internal server error", None, "internal_error")


class ApiKey:
    """With a key set, every path but the exempt ones needs `Authorization: Bearer <key>`. The
    exemption matches the decoded path exactly, so no variant of another route slips through."""

    def __init__(self, app, api_key: str | None, exempt: set[str]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.exempt = exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        got = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(got, self.expected):
            return await _send_error(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                     None, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a body over `max_bytes` with 413 before anything parses it: at once from
    Content-Length, or while reading a chunked body (which is buffered up to the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than the limit of {self.max_bytes} bytes"
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if n > self.max_bytes:
                return await _send_error(send, 413, too_big, None, "body_too_large")
            return await self.app(scope, receive, send)
        # No length given (chunked): read it all here, within the limit, then replay it.
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before the body was complete
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await _send_error(send, 413, too_big, None, "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

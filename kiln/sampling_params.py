"""How one request wants its tokens chosen and when it wants to stop."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from kiln.errors import RequestError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 32  # stop strings per request ...
MAX_STOP_CHARS = 1024  # ... each at most this long: every generated token scans for them
MAX_STOP_TOKEN_IDS = 256
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily

_INT_FIELDS = ("max_tokens", "top_k", "n", "min_tokens", "priority")
_OPTIONAL_INT_FIELDS = ("seed", "logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens")


def _as_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise RequestError(f"{name} must be an integer, got {v!r}", param=name)
    return int(v)


def _as_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise RequestError(f"{name} must be a number, got {v!r}", param=name)
    return float(v)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; validated on construction (bad values raise RequestError)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # OpenAI semantics, on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus top-k alternatives
    skip_special_tokens: bool = True
    priority: int = 0  # lower runs earlier

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()

    def _normalize(self) -> None:
        """Check each field's type and store it as a plain Python value (numpy ints become int)."""
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        for name in _INT_FIELDS:
            put(name, _as_int(name, getattr(self, name)))
        for name in _OPTIONAL_INT_FIELDS:
            v = getattr(self, name)
            put(name, None if v is None else _as_int(name, v))
        for name in _FLOAT_FIELDS:
            put(name, _as_float(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be true or false", param=name)
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise RequestError("stop must be a string or a list of strings", param="stop")
        put("stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise RequestError("stop_token_ids must be a list of integers", param="stop_token_ids")
        put("stop_token_ids", tuple(_as_int("stop_token_ids", t) for t in ids))

    def _validate(self) -> None:
        def bad(param: str, msg: str) -> RequestError:
            return RequestError(f"{param} {msg}", param=param)

        if not 1 <= self.max_tokens < 2**31:
            raise bad("max_tokens", f"must be in [1, 2^31), got {self.max_tokens}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"must be in [0, 2], got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k < 2**31:
            raise bad("top_k", f"must be -1 (disabled) or positive, got {self.top_k}")
        if not -(2**31) <= self.priority < 2**31:
            raise bad("priority", f"must be a 32-bit integer, got {self.priority}")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2.0 <= v <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {v}")
        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be between 1 and {MAX_N}, got {self.n}")
        if any(not s for s in self.stop):
            raise bad("stop", "must not contain an empty string")
        if len(self.stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise bad("stop", f"allows at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(not 0 <= t < 2**31 for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"allows at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        # Below GREEDY_TEMPERATURE, logits / temperature would overflow float32; the result is the
        # argmax anyway.
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

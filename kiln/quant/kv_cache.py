"""The FP8 KV cache: keys and values stored as E4M3 codes with one scale per layer for each.

`kiln build --kv-cache-dtype fp8` calibrates the scales: the largest |k| (after rotary embedding)
and |v| each layer wrote into the cache over the calibration windows, divided by 448 (E4M3's
largest finite value). Values beyond the calibrated range saturate at +-448 codes. The manifest's
`quant.kv_cache` records the dtype, the scales and their origin, and the accuracy gate measures
the engine with its fp8 cache.

Attention reads the codes, converts them to the model dtype and folds the scales into the score
scale (k) and the output normalization (v): a cached token takes half the bytes of fp16/bf16, so
decode attention reads half as much and the pool holds twice the tokens. A fresh prompt's own
attention (GPU) uses its unquantized keys and values; everything after reads the cache.

This module parses the manifest entry without torch (the HTTP process reads manifests);
`quantize_kv` / `dequantize_kv` are the reference conversions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KV_CACHE_DTYPES = ("auto", "fp8")  # `kiln build --kv-cache-dtype`: auto = the engine dtype
FP8_KV = "float8_e4m3fn"


@dataclass(frozen=True)
class KVCacheSpec:
    """A quantized KV cache: its stored dtype and per-layer (k, v) scales."""

    dtype: str
    k_scales: tuple[float, ...]
    v_scales: tuple[float, ...]

    @classmethod
    def from_manifest(cls, quant: Any, num_layers: int) -> KVCacheSpec | None:
        """The spec in a manifest's `quant` entry, or None (the cache is in the engine dtype).
        Raises ValueError for a malformed entry."""
        kv = quant.get("kv_cache") if isinstance(quant, dict) else None
        if kv is None:
            return None
        if not isinstance(kv, dict) or kv.get("dtype") != FP8_KV:
            raise ValueError(f"unknown KV cache entry {kv!r}; kiln knows dtype {FP8_KV!r}")
        ks, vs = kv.get("k_scale"), kv.get("v_scale")
        for name, s in (("k_scale", ks), ("v_scale", vs)):
            if not isinstance(s, list) or len(s) != num_layers or not all(
                    isinstance(x, (int, float)) and x > 0 for x in s):
                raise ValueError(f"kv_cache.{name} must list {num_layers} positive scales")
        return cls(FP8_KV, tuple(float(x) for x in ks), tuple(float(x) for x in vs))

    def layer(self, i: int) -> tuple[float, float]:
        return self.k_scales[i], self.v_scales[i]


def quantize_kv(x, scale: float):
    """[..., D] keys or values -> float8_e4m3fn codes of x / scale, saturated to +-448."""
    from kiln.quant.fp8 import fp8_codes

    return fp8_codes(x, scale)


def dequantize_kv(codes, scale: float, dtype):
    """Codes -> values in `dtype` (codes * scale in float32, rounded once)."""
    return (codes.float() * scale).to(dtype)


def kv_record(k_absmax: list[float], v_absmax: list[float], calibration_desc: str) -> dict:
    """The manifest's `quant.kv_cache` entry from per-layer calibration maxima."""
    from kiln.quant.fp8 import FP8_MAX

    def scale(m):
        return float(m) / FP8_MAX if m > 0 else 1.0

    return {"dtype": FP8_KV, "granularity": "per layer, one scale for keys and one for values",
            "k_scale": [scale(m) for m in k_absmax], "v_scale": [scale(m) for m in v_absmax],
            "scale": f"max |k| (after rotary embedding) and max |v| cached per layer over {calibration_desc}, "
                     f"/ {FP8_MAX:g}; larger values saturate"}

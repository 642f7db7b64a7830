"""Quantization recipes: what an engine's manifest says about its precision, and which tensors that
makes (torch-free: the API process reads manifests too).

Every recipe quantizes the four linear layers of each decoder layer (qkv, o, gate|up, down); the
embedding, the LM head and the norms keep the engine dtype. A quantized linear `X` stores
`X.qweight` (int8 or float8_e4m3fn codes, [out, in]) and `X.wscale` (float32 per output channel);
with static fp8 activations also `X.act_scale` (float32 [1]); its bias, if any, stays `X.bias`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RECIPES = ("none", "int8-weight", "int8-sq", "fp8")
FP8_ACTIVATIONS = ("dynamic", "static")
QUANT_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
WEIGHT_DTYPES = {"int8-weight": "int8", "int8-sq": "int8", "fp8": "float8_e4m3fn"}


@dataclass(frozen=True)
class QuantScheme:
    """How an engine's linear layers compute: the recipe and its activation handling."""

    recipe: str  # one of RECIPES except "none"
    activations: str = "dynamic"  # fp8 only: "dynamic" (per token) or "static" (per tensor)
    rotate: int = 0  # Hadamard block of the down_proj / o_proj input rotations (kiln.quant.rotate); 0: none

    def __post_init__(self):
        if self.recipe not in WEIGHT_DTYPES:
            raise ValueError(f"unknown quantization recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.activations not in FP8_ACTIVATIONS:
            raise ValueError(f"unknown activation scheme {self.activations!r}")

    @property
    def weight_dtype(self) -> str:
        return WEIGHT_DTYPES[self.recipe]

    @property
    def act_quant(self) -> str | None:
        """None (activations stay in the engine dtype), "int8" or "fp8": per-token dynamic, or for
        static fp8 one calibrated scale per layer input."""
        return {"int8-weight": None, "int8-sq": "int8", "fp8": "fp8"}[self.recipe]

    @property
    def static_act_scale(self) -> bool:
        return self.recipe == "fp8" and self.activations == "static"

    @classmethod
    def from_manifest(cls, quant: Any) -> QuantScheme | None:
        """The scheme of a manifest's `quant` entry (None: unquantized). Raises ValueError."""
        if quant is None:
            return None
        if not isinstance(quant, dict) or not isinstance(quant.get("recipe"), str):
            raise ValueError("quant entry must be an object with a string 'recipe'")
        if quant["recipe"] == "none":
            return None
        acts = quant.get("activations") or {}
        rot = quant.get("rotation") or {}
        block = rot.get("block", 0) if isinstance(rot, dict) else 0
        if not isinstance(block, int) or block < 0 or block & (block - 1):
            raise ValueError(f"rotation block must be a power of two, got {block!r}")
        return cls(quant["recipe"], acts.get("scheme", "dynamic") if quant["recipe"] == "fp8" else "dynamic", block)


def quantized_linear_names(num_layers: int) -> list[str]:
    """Module names of every quantized linear layer, in layer order."""
    return [f"layers.{i}.{n}" for i in range(num_layers) for n in QUANT_LINEARS]


def gate_summary(quant: Any) -> dict | None:
    """A short public view of an engine's quantization: the recipe and its accuracy gate result
    (for /v1/models and the serve log); None for an unquantized engine."""
    if not isinstance(quant, dict) or (quant.get("recipe") in (None, "none") and not quant.get("kv_cache")):
        return None
    gate = quant.get("accuracy_gate") or {}
    out = {"recipe": quant["recipe"]}
    if quant.get("kv_cache"):
        out["kv_cache_dtype"] = quant["kv_cache"].get("dtype")
    if quant.get("recipe") == "fp8":
        out["activations"] = (quant.get("activations") or {}).get("scheme", "dynamic")
    if quant.get("smoothquant"):
        out["smoothquant_alpha"] = quant["smoothquant"].get("alpha")
    if (quant.get("rotation") or {}).get("block"):
        out["rotation"] = f"hadamard-{quant['rotation']['block']}"
    if gate.get("enabled"):
        out["accuracy_gate"] = {k: gate.get(k) for k in (
            "passed", "ppl_reference", "ppl_quantized", "increase_pct", "max_increase_pct", "tokens")}
    else:
        out["accuracy_gate"] = "skipped"
    return out


def describe(quant: Any) -> str:
    """One line for logs: 'int8-sq (alpha 0.5), gate passed: ppl 13.39 -> 13.46 (+0.52%, max 1.0%)'."""
    s = gate_summary(quant)
    if s is None:
        return "none"
    head = s["recipe"] if s["recipe"] != "none" else "weights unquantized"
    if "smoothquant_alpha" in s:
        head += f" (alpha {s['smoothquant_alpha']})"
    if s.get("activations") == "static":
        head += " (static activation scales)"
    if "rotation" in s:
        head += f" ({s['rotation']} rotations)"
    if "kv_cache_dtype" in s:
        head += f", {s['kv_cache_dtype']} KV cache"
    g = s["accuracy_gate"]
    if g == "skipped":
        return head + ", accuracy gate skipped (--no-accuracy-gate)"
    return (f"{head}, gate {'passed' if g['passed'] else 'FAILED'}: ppl {g['ppl_reference']:.4g} -> "
            f"{g['ppl_quantized']:.4g} ({g['increase_pct']:+.2f}%, max {g['max_increase_pct']}%)")

"""Turn an unquantized engine's tensors into a quantized engine's (kiln.quant.recipe's layout), one
decoder layer at a time, and describe in the manifest where every scale came from."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kiln.config import ModelConfig
from kiln.model.layout import WeightSpec, runtime_layout
from kiln.quant.fp8 import FP8_MAX, quantize_rows_fp8
from kiln.quant.int8 import QMAX, quantize_rows
from kiln.quant.recipe import QuantScheme
from kiln.quant.rotate import rotate_layer
from kiln.quant.smooth import FOLDS, smooth_layer


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def quantized_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, scheme: QuantScheme, dtype: torch.dtype,
                      stats: dict[str, torch.Tensor] | None = None, alpha: float | dict | None = None,
                      device: str | torch.device = "cpu") -> Iterator[tuple[WeightSpec, torch.Tensor]]:
    """(spec, tensor on the CPU) for every tensor of the quantized layout, in its order.

    `tensors`: the unquantized engine's runtime tensors (dtype `dtype`). `stats`: calibration
    maxima per linear input (kiln.quant.calibrate), needed for int8-sq (with `alpha`: one value, or
    one per linear from kiln.quant.smooth.search_alphas) and for
    static fp8 activation scales. `device`: where the arithmetic runs (a GPU quantizes 7B in seconds).
    With `scheme.rotate` the smoothed float weights are rotated (kiln.quant.rotate) before quantization.
    """
    smooth = scheme.recipe == "int8-sq"
    if (smooth or scheme.static_act_scale) and stats is None:
        raise ValueError(f"{scheme.recipe} needs calibration statistics")
    quantize = quantize_rows if scheme.weight_dtype == "int8" else quantize_rows_fp8
    layer, cache = None, {}
    for spec in runtime_layout(cfg, scheme):
        i = _layer_of(spec.name)
        if i is not None and i != layer:
            layer, cache = i, {}
            if smooth or scheme.rotate:
                layer_tensors = {k: v.to(device) for k, v in tensors.items() if _layer_of(k) == i}
                cache = (smooth_layer(layer_tensors, cfg, i, stats, alpha) if smooth
                         else {k: v.float().clone() for k, v in layer_tensors.items()})
                if scheme.rotate:
                    rotate_layer(cache, cfg, i, scheme.rotate)
        prefix, _, leaf = spec.name.rpartition(".")
        if leaf == "qweight":
            w = cache.get(prefix + ".weight")
            w = tensors[prefix + ".weight"].to(device) if w is None else w
            q, s = quantize(w)
            cache[prefix + ".wscale"] = s
            out = q
        elif leaf == "wscale":
            out = cache.pop(spec.name)
        elif leaf == "act_scale":
            amax = stats[prefix].max().float()
            out = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).reshape(1)
        else:
            t = cache.get(spec.name)
            out = tensors[spec.name] if t is None else t.to(dtype)
        yield spec, out.cpu().contiguous()


def quant_record(scheme: QuantScheme, alpha: float | str | None, calibration: dict | None,
                 alphas: dict[str, float] | None = None) -> dict:
    """The manifest's `quant` entry before the gate: the recipe and the origin of every scale."""
    wmax = QMAX if scheme.weight_dtype == "int8" else FP8_MAX
    rec: dict = {
        "recipe": scheme.recipe,
        "quantized": "every decoder layer's qkv_proj, o_proj, gate_up_proj and down_proj; the embedding, "
                     "LM head and norms keep the engine dtype",
        "weights": {"dtype": scheme.weight_dtype, "granularity": "per output channel", "symmetric": True,
                    "scale": f"max |w| of each output row / {wmax:g}, computed by the build"
                             + (" from the smoothed weights" if scheme.recipe == "int8-sq" else ""),
                    "tensors": "<linear>.qweight (codes), <linear>.wscale (float32 [out])"},
    }
    act = scheme.act_quant
    if act is None:
        rec["activations"] = {"dtype": "engine dtype", "scale": "none (not quantized)"}
    elif scheme.static_act_scale:
        rec["activations"] = {"dtype": "float8_e4m3fn", "scheme": "static", "granularity": "per tensor",
                              "scale": "calibration max |x| of the layer input / 448, stored as "
                                       "<linear>.act_scale; values beyond it saturate"}
    else:
        rec["activations"] = {"dtype": "int8" if act == "int8" else "float8_e4m3fn", "scheme": "dynamic",
                              "granularity": "per token",
                              "scale": f"max |x| of each token's row / {QMAX if act == 'int8' else FP8_MAX:g}, "
                                       "computed at run time",
                              "small_batch": "steps of <= 16 tokens keep activations in the engine dtype "
                                             "(the step is a pass over the weights either way)"}
    if scheme.recipe == "int8-sq":
        rec["smoothquant"] = {"alpha": alpha, "factors": "s = max|x|^alpha / max|w|^(1-alpha) per input "
                              "channel, from calibration.safetensors", "folded_into": dict(FOLDS)}
        if alphas is not None:
            rec["smoothquant"]["alphas"] = alphas
            rec["smoothquant"]["alpha_choice"] = ("per linear layer, the alpha of 0.3..0.9 whose W8A8 product is "
                                                  "closest to the float product on calibration input rows")
    if scheme.rotate:
        b = scheme.rotate
        rec["rotation"] = {
            "block": b, "matrix": f"block-diagonal Sylvester Hadamard of {b} channels, normalized",
            "mlp.down_proj": "input rotated at run time; weight columns rotated by the build",
            "attn.o_proj": "folded: each head's v rows of attn.qkv_proj (and bias) and o_proj's columns rotated "
                           "by the build (values are cached rotated)",
            "order": "after the SmoothQuant folds, before weight quantization"}
    if calibration is not None:
        rec["calibration"] = calibration
    return rec

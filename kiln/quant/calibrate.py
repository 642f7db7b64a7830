"""Calibration: activation statistics of the unquantized engine on calibration text.

For each quantized linear layer's input (kiln.quant.recipe.QUANT_LINEARS) the largest absolute
value seen in each input channel, over every token of every calibration window. SmoothQuant's
smoothing factors come from these per-channel maxima; static fp8 activation scales from their max.
Also the largest |k| (after rotary embedding) and |v| each layer writes into the KV cache, read
from the pool after every window: an fp8 KV cache's scales (kiln.quant.kv_cache) come from them.
They are saved in the engine directory (`calibration.safetensors`: one float32 [in] tensor per
linear layer named `<linear>.input_absmax`, and `kv_cache.absmax` [layers, 2] for k and v), so a
build's scales can be traced back to their data.
"""

from __future__ import annotations

import sys

import torch

from kiln.engine.core import EngineCore
from kiln.quant.perplexity import window_forward
from kiln.quant.recipe import quantized_linear_names

CALIBRATION_NAME = "calibration.safetensors"
KV_STATS = "kv_cache"  # the stats entry of the per-layer (k, v) maxima [layers, 2]


@torch.inference_mode()
def activation_absmax(core: EngineCore, windows: list[list[int]], progress: bool = True,
                      sample_rows: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({linear name: float32 [in_features] per-channel max |x|} over all windows, on the CPU, and
    KV_STATS: float32 [layers, 2] max |k|, |v| cached per layer;
    {linear name: [<= sample_rows, in_features] input rows}, taken evenly from every window (not its
    first token), for choosing SmoothQuant's alpha per layer: empty when sample_rows is 0)."""
    from tqdm import tqdm

    model = core.runner.model
    names = quantized_linear_names(core.manifest.model.num_layers)
    modules = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    per_window = -(-sample_rows // max(len(windows), 1)) if sample_rows else 0

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            m = x.abs().amax(dim=0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)
            if per_window:
                idx = torch.linspace(1, x.shape[0] - 1, per_window, device=x.device).round().long()
                samples.setdefault(name, []).append(x.index_select(0, idx).cpu())
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    kv_max = None
    try:
        for w in tqdm(windows, desc="calibrating", unit="window", file=sys.stderr, disable=not progress):
            if len(w) <= 16:  # the fused small-batch GPU path bypasses the linear modules
                raise ValueError("calibration windows must be longer than 16 tokens")
            with window_forward(core, w):
                pass
            # the pool holds this window's keys and values (and older ones, already counted)
            kv = core.runner.kv_caches.abs().amax(dim=(2, 3, 4, 5)).float()
            kv_max = kv if kv_max is None else torch.maximum(kv_max, kv)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in stats]
    if missing:
        raise RuntimeError(f"calibration saw no input for {missing[0]}")
    out = {n: stats[n].cpu() for n in names}
    out[KV_STATS] = kv_max.cpu()
    return out, ({n: torch.cat(samples[n])[:sample_rows] for n in names} if sample_rows else {})


def save_stats(path, stats: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({f"{n}.absmax" if n == KV_STATS else f"{n}.input_absmax": t.contiguous() for n, t in stats.items()},
              str(path))

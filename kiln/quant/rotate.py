"""Hadamard rotations before int8 activation quantization (int8-sq).

A per-token quantizer gives a whole row one scale, so a few outlier channels in a token leave the
other channels with a few codes each. Rotating the row by an orthogonal matrix H spreads each
outlier over many channels while keeping the product: x @ W^T = (x @ H) @ (W @ H)^T. kiln uses the
block-diagonal Sylvester Hadamard of BLOCK channels (entries +-1/sqrt(BLOCK), H = H^T = H^-1) and
rotates the two layer inputs with the worst outliers (calibration of the default model: per-token
int8 on down_proj's input costs most of SmoothQuant's perplexity loss, o_proj's next):

- down_proj: its input silu(gate) * up is made at run time, so it is rotated online (one small
  matmul per step, `block_rotate`) and the build rotates the weight's columns;
- o_proj: its input is a weighted sum of value vectors, so the rotation folds into the weights
  and costs nothing at run time: each head's v rows of qkv_proj (and bias) become H^T @ rows, the
  values (and the KV cache) are stored rotated, and o_proj's columns are rotated per head.

fp8 does not rotate: E4M3 keeps the same relative precision over its whole range, so outliers cost
it little, and on the default model rotations made dynamic fp8 worse (+3.78% against +3.22%).

Both are applied after SmoothQuant's folds (kiln.quant.smooth), to the smoothed float weights,
before the per-channel weight quantization.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig

BLOCK = 64  # the largest block used; a model whose shapes it does not divide gets a smaller one
MIN_BLOCK = 16
_CACHE: dict = {}


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), normalized: orthogonal, float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotation_block_for(cfg: ModelConfig) -> tuple[int, str | None]:
    """(the largest power-of-two block <= BLOCK dividing both down_proj's input width and the head
    dim, None), or (0, why none) when that would be under MIN_BLOCK."""
    b = BLOCK
    while b >= MIN_BLOCK and (cfg.intermediate_size % b or cfg.head_dim % b):
        b //= 2
    if b < MIN_BLOCK:
        return 0, (f"intermediate_size {cfg.intermediate_size} and head_dim {cfg.head_dim} have no common "
                   f"power-of-two factor >= {MIN_BLOCK}")
    return b, None


def _matrix(block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (block, dtype, device)
    if key not in _CACHE:
        _CACHE[key] = hadamard(block).to(device=device, dtype=dtype)
    return _CACHE[key]


def block_rotate(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x [..., K] @ blockdiag(H, ..., H) along the last dimension (K a multiple of `block`)."""
    shape = x.shape
    h = _matrix(block, x.dtype, x.device)
    return (x.reshape(-1, block) @ h).reshape(shape)


def rotate_layer(f: dict[str, torch.Tensor], cfg: ModelConfig, layer: int, block: int = BLOCK) -> None:
    """Rotate one decoder layer's float32 tensors `f` (runtime names) in place: down_proj's columns,
    the v rows of qkv_proj (and bias) per head, o_proj's columns (module docstring)."""
    p = f"layers.{layer}."
    h = hadamard(block).to(f[p + "mlp.down_proj.weight"].device)

    def cols(w):  # w [out, in] -> w @ blockdiag(H)
        return (w.reshape(-1, block) @ h).reshape(w.shape)

    f[p + "mlp.down_proj.weight"] = cols(f[p + "mlp.down_proj.weight"])
    f[p + "attn.o_proj.weight"] = cols(f[p + "attn.o_proj.weight"])
    v0 = cfg.q_size + cfg.kv_size
    qkv = f[p + "attn.qkv_proj.weight"]
    v = qkv[v0:v0 + cfg.kv_size].reshape(-1, block, qkv.shape[1])  # [kv_size / block, block, hidden]
    qkv[v0:v0 + cfg.kv_size] = (h.T @ v).reshape(cfg.kv_size, qkv.shape[1])
    if cfg.qkv_bias:
        b = f[p + "attn.qkv_proj.bias"]
        b[v0:v0 + cfg.kv_size] = (b[v0:v0 + cfg.kv_size].reshape(-1, block) @ h).reshape(-1)

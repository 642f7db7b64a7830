"""Chained, collision-resistant hashes of full KV-cache blocks, for prefix caching.

A block's hash covers its own token ids and, through the parent hash, every token before it,
so two blocks with equal hashes hold K/V for the same whole prefix. sha256 only: Python's
hash() is salted per process and far too collision-prone for this.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

_EMPTY = b""


def _pack(token_ids: Sequence[int]) -> bytes:
    a = array("I", token_ids)  # uint32; raises OverflowError on negative or huge ids
    if a.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte 'I'
        a = array("L", token_ids)
    if sys.byteorder != "little":  # pragma: no cover
        a.byteswap()
    return a.tobytes()


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """sha256(parent hash or b"" + token ids as little-endian uint32)."""
    h = hashlib.sha256(parent if parent is not None else _EMPTY)
    h.update(_pack(token_ids))
    return h.digest()


def block_hashes_for(token_ids: Sequence[int], block_size: int, existing: list[bytes]) -> list[bytes]:
    """Extend `existing` (in place, and return it) with the hashes of newly full blocks of `token_ids`."""
    num_full = len(token_ids) // block_size
    parent = existing[-1] if existing else None
    for i in range(len(existing), num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        existing.append(parent)
    return existing

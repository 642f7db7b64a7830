"""A fixed pool of KV-cache blocks: ref counts, an LRU free list and the prefix-cache index.

Block 0 is the null block (padding in block tables); it is never handed out. A free block may
still hold a hash: its K/V stay valid and a later request can reuse them (a cache hit) until the
block is evicted, i.e. handed out again for new tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """allocate() asked for more blocks than are free; check num_free first."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        # Front is allocated (and evicted) first: unhashed blocks, then the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._cache: dict[bytes, int] = {}
        # Counters.
        self.query_blocks = 0  # lookup() calls
        self.hit_blocks = 0  # lookup() calls that found a block
        self.query_tokens = 0  # tokens of admitted requests checked against the cache
        self.hit_tokens = 0  # of those, tokens served from the cache
        self.num_evictions = 0

    # ---------------------------------------------------------------- counters
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (in use or free)."""
        return len(self._cache)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_usable

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.query_tokens += num_tokens
        self.hit_tokens += num_hit_tokens

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def free_block_ids(self) -> list[int]:
        """Free blocks in allocation order (first is handed out / evicted first)."""
        return list(self._free)

    # ---------------------------------------------------------------- operations
    def allocate(self, n: int) -> list[int]:
        """Hand out `n` blocks with ref_count 1, evicting cached free blocks as needed."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                if self._cache.get(h) == b:
                    del self._cache[h]
                self._hash[b] = None
                self.num_evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def lookup(self, block_hash: bytes) -> int | None:
        self.query_blocks += 1
        if not self.enable_prefix_caching:
            return None
        b = self._cache.get(block_hash)
        if b is not None:
            self.hit_blocks += 1
        return b

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a cache hit), pulling them off the free list."""
        for b in block_ids:
            self._check(b)
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block of a block table; tail blocks are freed first, so
        they are evicted before the (more shareable) head blocks."""
        for b in reversed(block_ids):
            self._check(b)
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} freed more times than it was taken")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Register a full, computed block under its hash. If another block already holds the
        hash, keep that mapping and leave this one unhashed. Returns True when registered."""
        self._check(block_id)
        if not self.enable_prefix_caching:
            return False
        cur = self._hash[block_id]
        if cur is not None:
            return cur == block_hash
        if block_hash in self._cache:
            return False
        self._cache[block_hash] = block_id
        self._hash[block_id] = block_hash
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every hash; only when no block is in use. Returns whether it did."""
        if self.num_free != self.num_usable:
            return False
        self._cache.clear()
        self._hash = [None] * self.num_blocks
        return True

    def _check(self, b: int) -> None:
        if not 0 < b < self.num_blocks:
            raise ValueError(f"block id {b} is not a usable block (1..{self.num_blocks - 1})")

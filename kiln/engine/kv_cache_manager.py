"""Per-request block tables on top of the block pool, with prefix-cache lookups."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.engine.block_pool import BlockPool
from kiln.engine.prefix_hash import block_hashes_for
from kiln.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        # request_id -> how many of its leading blocks were already offered to the cache.
        self._num_registered: dict[str, int] = {}

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_hashes(self, req: Request) -> list[bytes]:
        """Bring req.block_hashes up to date with its full blocks (prompt and outputs)."""
        if len(req.block_hashes) < req.num_tokens // self.block_size:
            block_hashes_for(req.all_token_ids, self.block_size, req.block_hashes)
        return req.block_hashes

    def get_computed_prefix(self, req: Request) -> tuple[list[int], int]:
        """The longest run of req's leading full blocks found in the cache, and its token count.

        At least one token is always left to compute (the runner needs one to sample from), so
        a request whose every token would hit gets its last hit block dropped. Takes no
        references: pass the blocks to allocate_slots() before anything else allocates.
        """
        if not self.enable_prefix_caching or req.num_tokens == 0:
            return [], 0
        hashes = self.update_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Make req.block_ids cover num_computed_tokens + num_new_tokens tokens.

        `cached_blocks` (from get_computed_prefix, already counted in num_computed_tokens) are
        appended first and take a reference. All or nothing: on False nothing changed.
        """
        need_total = self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens)
        have = len(req.block_ids) + len(cached_blocks)
        num_new_blocks = max(0, need_total - have)
        # Cached blocks that sit on the free list stop being allocatable once touched.
        num_reclaimed = sum(1 for b in cached_blocks if self.pool.ref_count(b) == 0)
        if num_new_blocks > self.pool.num_free - num_reclaimed:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            req.block_ids.extend(cached_blocks)
            self._num_registered[req.request_id] = max(
                self._num_registered.get(req.request_id, 0), len(req.block_ids)
            )
        if num_new_blocks:
            req.block_ids.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Register the hashes of req's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        start = self._num_registered.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self.update_hashes(req)
        for i in range(start, num_full):
            self.pool.cache_block(req.block_ids[i], hashes[i])
        self._num_registered[req.request_id] = num_full

    def free(self, req: Request) -> None:
        """Release every block of req (tail first) and clear its block table."""
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids.clear()
        self._num_registered.pop(req.request_id, None)

"""Block pool, prefix hashes and the KV cache manager (no device, no torch)."""

import pytest

from kiln.engine.block_pool import NULL_BLOCK, BlockPool, OutOfBlocksError
from kiln.engine.kv_cache_manager import KVCacheManager
from kiln.engine.prefix_hash import block_hashes_for, hash_block
from kiln.engine.request import Request
from kiln.sampling_params import SamplingParams


def test_hash_block_chained_and_stable():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert len(a) == 32
    assert hash_block(None, [1, 2, 3, 5]) != a
    # Same tokens, different parents: different hashes.
    p1, p2 = hash_block(None, [9, 9]), hash_block(None, [8, 8])
    assert hash_block(p1, [1, 2]) != hash_block(p2, [1, 2])
    assert hash_block(p1, [1, 2]) != hash_block(None, [1, 2])
    # Packing is fixed width: [1, 256] differs from [257] or [1, 0, 1].
    assert hash_block(None, [1, 256]) != hash_block(None, [257])
    assert hash_block(None, [0x01020304]) == hash_block(b"", bytes([4, 3, 2, 1]))


def test_block_hashes_for_extends_full_blocks_only():
    hs: list[bytes] = []
    block_hashes_for([1, 2, 3], 2, hs)
    assert len(hs) == 1
    first = hs[0]
    block_hashes_for([1, 2, 3, 4, 5], 2, hs)
    assert len(hs) == 2 and hs[0] == first
    assert hs[1] == hash_block(first, [3, 4])


def test_allocate_free_refcounts_and_null_block():
    pool = BlockPool(5, 4)
    assert pool.num_usable == 4 and pool.num_free == 4 and pool.usage == 0.0
    blocks = pool.allocate(4)
    assert NULL_BLOCK not in blocks and sorted(blocks) == [1, 2, 3, 4]
    assert pool.num_free == 0 and pool.usage == 1.0
    assert all(pool.ref_count(b) == 1 for b in blocks)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)
    pool.free(blocks)
    assert pool.num_free == 4 and all(pool.ref_count(b) == 0 for b in blocks)
    with pytest.raises(ValueError):
        pool.free([blocks[0]])  # double free
    with pytest.raises(ValueError):
        pool.touch([NULL_BLOCK])
    # Allocating everything many times never yields the null block.
    for _ in range(3):
        got = pool.allocate(4)
        assert NULL_BLOCK not in got
        pool.free(got)


def test_cache_hit_reuse_and_touch():
    pool = BlockPool(6, 2)
    [b] = pool.allocate(1)
    h = hash_block(None, [1, 2])
    assert pool.lookup(h) is None
    assert pool.cache_block(b, h)
    assert pool.lookup(h) == b and pool.num_cached == 1
    pool.touch([b])  # a second user while the first still holds it
    assert pool.ref_count(b) == 2
    pool.free([b])
    pool.free([b])
    assert pool.is_free(b) and pool.lookup(h) == b  # free but still cached
    pool.touch([b])  # hit on a free cached block takes it off the free list
    assert not pool.is_free(b) and pool.ref_count(b) == 1 and pool.num_free == 4
    pool.free([b])
    assert pool.hit_blocks == 2 and pool.query_blocks == 3


def test_duplicate_hash_keeps_existing_mapping():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    h = hash_block(None, [5, 6])
    assert pool.cache_block(a, h)
    assert not pool.cache_block(b, h)
    assert pool.lookup(h) == a and pool.block_hash(b) is None


def test_lru_eviction_order():
    pool = BlockPool(5, 1)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.cache_block(b, hash_block(None, [i]))
    b1, b2, b3, b4 = blocks
    pool.free([b3])
    pool.free([b1])
    pool.free([b4, b2])  # a table: tail (b2) freed first
    assert pool.free_block_ids() == [b3, b1, b2, b4]
    [x] = pool.allocate(1)
    assert x == b3 and pool.lookup(hash_block(None, [2])) is None  # evicted: hash gone
    assert pool.lookup(hash_block(None, [0])) == b1
    assert pool.num_cached == 3 and pool.block_hash(x) is None


def test_unhashed_blocks_are_allocated_before_cached_ones():
    pool = BlockPool(4, 1)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, hash_block(None, [1]))
    pool.free([a])
    pool.free([b])  # unhashed: goes to the front
    assert pool.allocate(1) == [b]
    pool.free([c])
    assert pool.allocate(2) == [c, a]


def test_prefix_caching_disabled():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    [a] = pool.allocate(1)
    assert not pool.cache_block(a, b"x" * 32)
    assert pool.lookup(b"x" * 32) is None and pool.num_cached == 0


def _req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def test_kv_manager_prefix_and_slots():
    kv = KVCacheManager(num_blocks=9, block_size=4)
    r1 = _req("a", range(10))  # 2 full blocks + 2
    assert kv.get_computed_prefix(r1) == ([], 0)
    assert kv.allocate_slots(r1, 10)
    assert len(r1.block_ids) == 3
    r1.num_computed_tokens = 10
    kv.cache_computed_blocks(r1)
    assert kv.pool.num_cached == 2

    r2 = _req("b", list(range(8)) + [99, 98, 97])
    blocks, n = kv.get_computed_prefix(r2)
    assert blocks == r1.block_ids[:2] and n == 8
    r2.num_computed_tokens = n
    assert kv.allocate_slots(r2, 3, blocks)
    assert r2.block_ids[:2] == r1.block_ids[:2] and len(r2.block_ids) == 3
    assert kv.pool.ref_count(r1.block_ids[0]) == 2

    # Exactly two full blocks, all cached: the last hit is dropped so one token is computed.
    r3 = _req("c", range(8))
    blocks, n = kv.get_computed_prefix(r3)
    assert len(blocks) == 1 and n == 4

    # All or nothing.
    free_before = kv.pool.num_free
    r4 = _req("d", range(100, 130))
    assert not kv.allocate_slots(r4, 30)
    assert r4.block_ids == [] and kv.pool.num_free == free_before

    kv.free(r2)
    kv.free(r1)
    assert r1.block_ids == [] and kv.pool.num_free == kv.pool.num_usable
    assert kv.pool.num_cached == 2  # still cached while free


def test_allocate_slots_counts_free_cached_blocks_it_reclaims():
    kv = KVCacheManager(num_blocks=4, block_size=2)  # 3 usable
    r1 = _req("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(r1, 5)
    r1.num_computed_tokens = 5
    kv.cache_computed_blocks(r1)
    kv.free(r1)  # 3 free, 2 of them cached
    r2 = _req("b", [1, 2, 3, 4, 7, 8, 9])  # hits 2 blocks, needs 2 more: 4 > 3
    blocks, n = kv.get_computed_prefix(r2)
    assert n == 4
    r2.num_computed_tokens = n
    assert not kv.allocate_slots(r2, 3, blocks)
    assert r2.block_ids == [] and kv.pool.num_free == 3
    assert kv.allocate_slots(r2, 1, blocks)  # 2 cached + 1 new
    assert len(r2.block_ids) == 3 and kv.pool.num_free == 0

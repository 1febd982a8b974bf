"""The prefix cache's bookkeeping, by hand: block-aligned matches, leaf-first LRU eviction, a bounded pool."""

import pytest

from fr_jax.rollout.prefix_cache import PrefixCache


def test_match_returns_the_cached_block_aligned_prefix():
    cache = PrefixCache(capacity=8, block_size=4)
    assert cache.match(range(10)) == []
    writes = cache.insert(list(range(10)))  # two full blocks; the last 2 tokens are not a block
    assert [number for number, _ in writes] == [0, 1]
    blocks = [block for _, block in writes]
    assert cache.match(list(range(10))) == blocks
    assert cache.match([0, 1, 2, 3, 9, 9, 9, 9]) == blocks[:1]  # shares the first block only
    assert cache.match([0, 1, 2]) == []  # shorter than a block
    assert cache.hit_tokens == 8 + 4
    assert cache.insert(list(range(8))) == []  # nothing new to write
    assert [n for n, _ in cache.insert(list(range(12)))] == [2]  # extends the path by one block


def test_eviction_takes_the_least_recently_used_leaf_first():
    cache = PrefixCache(capacity=3, block_size=2)
    a = cache.insert([1, 1, 2, 2])  # blocks a0 -> a1
    b = cache.insert([3, 3])  # block b0
    cache.match([3, 3])  # b0 is now more recent than a's path
    c = cache.insert([5, 5])  # full: evicts a leaf; a1 (a0 is a parent, never evicted before its children)
    assert cache.evicted_blocks == 1 and c[0][1] == a[1][1]
    assert cache.match([1, 1, 2, 2]) == [a[0][1]]  # a0 survives, a1 is gone
    assert cache.match([3, 3]) == [b[0][1]]
    assert cache.cached_blocks == 3


def test_a_prefix_longer_than_the_pool_keeps_its_head():
    cache = PrefixCache(capacity=2, block_size=1)
    writes = cache.insert([7, 8, 9, 10])
    assert len(writes) == 2, "no block may be evicted to make room for its own continuation"
    assert cache.match([7, 8, 9, 10]) == [block for _, block in writes]


def test_clear_and_a_disabled_cache():
    cache = PrefixCache(capacity=4, block_size=2)
    cache.insert([1, 2, 3, 4])
    cache.clear()
    assert cache.match([1, 2, 3, 4]) == [] and cache.cached_blocks == 0
    assert len(cache.insert([1, 2, 3, 4, 5, 6, 7, 8])) == 4  # every block is free again
    off = PrefixCache(capacity=0, block_size=16)
    assert off.insert(list(range(64))) == [] and off.match(list(range(64))) == []
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(capacity=4, block_size=0)

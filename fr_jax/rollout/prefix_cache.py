"""Which token prefixes have their K/V in the engine's block pool: a trie of fixed-size token blocks, LRU-evicted.

The engine keeps the K/V of cached prefixes in a device pool of `capacity` blocks of `block_size` tokens; this
module only decides which pool block holds which prefix (host bookkeeping, no arrays). A node stands for one
block of tokens after its parent's: the path from the root spells the prefix, so two prompts share exactly the
blocks of their common block-aligned prefix (a shared instruction prefix, the n samples of a GRPO group).

Eviction takes the least recently used leaf: a block is only ever dropped after every block that extends it,
so a cached path never has a hole. Matching touches a path from the root down, which leaves the deepest block
the most recent and its ancestors just before it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class _Node:
    __slots__ = ("block", "children", "parent", "tokens")

    def __init__(self, parent: _Node | None, tokens: tuple[int, ...], block: int):
        self.parent, self.tokens, self.block = parent, tokens, block
        self.children: dict[tuple[int, ...], _Node] = {}


class PrefixCache:
    """Maps block-aligned token prefixes to pool block indices in [0, capacity)."""

    def __init__(self, capacity: int, block_size: int):
        if capacity < 0 or block_size < 1:
            raise ValueError(f"prefix cache: capacity {capacity} must be >= 0 and block_size {block_size} >= 1")
        self.capacity, self.block_size = capacity, block_size
        self.clear()
        self.hit_tokens = self.evicted_blocks = 0

    def clear(self) -> None:
        """Forget every prefix (/flush_cache, new weights): all blocks are free again."""
        self._root = _Node(None, (), -1)
        self._lru: collections.OrderedDict[_Node, None] = collections.OrderedDict()  # oldest first
        self._free = list(range(self.capacity - 1, -1, -1))

    @property
    def cached_blocks(self) -> int:
        return len(self._lru)

    def _blocks(self, tokens: Sequence[int]):
        b = self.block_size
        for start in range(0, len(tokens) - b + 1, b):
            yield tuple(tokens[start : start + b])

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Pool blocks holding the longest cached block-aligned prefix of `tokens`, in order (marked as used)."""
        node, blocks = self._root, []
        for key in self._blocks(tokens):
            node = node.children.get(key)
            if node is None:
                break
            self._lru.move_to_end(node)
            blocks.append(node.block)
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    def insert(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """Cache the full blocks of `tokens`; returns (block number in `tokens`, pool block) for each block the
        caller must now write. Stops early when the pool cannot hold more without evicting this very prefix."""
        node, writes = self._root, []
        for number, key in enumerate(self._blocks(tokens)):
            child = node.children.get(key)
            if child is None:
                block = self._allocate(keep=node)
                if block is None:
                    break
                child = node.children[key] = _Node(node, key, block)
                writes.append((number, block))
            self._lru[child] = None
            self._lru.move_to_end(child)
            node = child
        return writes

    def _allocate(self, keep: _Node) -> int | None:
        """A free pool block, evicting the least recently used leaf other than `keep` (the block being extended)."""
        if self._free:
            return self._free.pop()
        for victim in self._lru:
            if not victim.children and victim is not keep:
                del self._lru[victim]
                del victim.parent.children[victim.tokens]
                self.evicted_blocks += 1
                return victim.block
        return None

"""The prefix cache's pool of KV pages, allocated with the plan, and the copies between it and the slots.

The engine's prefix cache (engine/prefix_cache.py) decides which page holds which tokens; the bytes move
here. One process holds all of a model's KV heads in `PagePool`. Under tensor parallel every rank holds
its own heads in a pool of its own, and rank 0's copy is a call every rank runs (parallel/runner.py
`TPPages`), so the decisions stay in one place while the bytes stay where their heads are.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from metronome.model.transformer import KVCache

# A page copy: (pool page, first position of the slot's range of `page` tokens)
Move = tuple[int, int]


class Pages(Protocol):
    """What the prefix cache asks of its pool."""

    page: int  # tokens per page
    pages: int  # pages in the pool

    @property
    def generation(self) -> int:
        """Changes when the pool's contents were lost (a tensor-parallel rank started again with an empty
        pool): every page the prefix cache knows of is then gone."""

    def nbytes(self) -> int:
        """Bytes of every pool this one stands for (all ranks')."""

    def copy(self, slot: int, moves: Sequence[Move], into_pool: bool, generation: int) -> bool:
        """For each (page, lo): the slot's positions lo..lo+page-1 into the pool's page (`into_pool`), or
        the page into those positions; only while the pool is still at `generation` (checked as the copy
        starts, where nothing else can change it). False: nothing was copied, the pool's pages are lost."""


class PagePool:
    """The pool of one process: its KV heads of `pages` pages, beside its KV cache `cache`."""

    generation = 0  # a process's own pool is never lost while it runs

    def __init__(self, cache: KVCache, pool: KVCache) -> None:
        def kind(c: KVCache) -> tuple:  # layers, kv heads, head dim, dtype: what a page and a slot must share
            return c.k.shape[0], c.k.shape[2], c.k.shape[4], c.k.dtype

        if kind(pool) != kind(cache):
            raise ValueError(
                f"the prefix pool's shape {tuple(pool.k.shape)} does not match the KV cache's {tuple(cache.k.shape)}"
            )
        self.cache, self.pool = cache, pool
        self.page = pool.ctx
        self.pages = pool.slots

    @classmethod
    def allocate(cls, cache: KVCache, pages: int, page: int) -> "PagePool":
        """A pool of `pages` pages of `page` tokens with the cache's layers, KV heads (a rank's own under
        tensor parallel), head size, dtype and device, allocated now: nothing is allocated while serving."""
        layers, _, heads, _, dim = cache.k.shape

        def zeros():
            return cache.k.new_zeros((layers, pages, heads, page, dim))

        return cls(cache, KVCache(zeros(), zeros()))

    def nbytes(self) -> int:
        return self.pool.nbytes()

    def copy(self, slot: int, moves: Sequence[Move], into_pool: bool, generation: int = 0) -> bool:
        n = self.page
        for page, lo in moves:
            if into_pool:
                self.pool.k[:, page].copy_(self.cache.k[:, slot, :, lo : lo + n])
                self.pool.v[:, page].copy_(self.cache.v[:, slot, :, lo : lo + n])
            else:
                self.cache.k[:, slot, :, lo : lo + n].copy_(self.pool.k[:, page])
                self.cache.v[:, slot, :, lo : lo + n].copy_(self.pool.v[:, page])
        return True

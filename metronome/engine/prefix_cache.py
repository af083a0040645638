"""The automatic prefix cache: the KV of prompts' shared beginnings, kept in a pool of pages for later requests.

A request whose prompt begins like an earlier one (a system prompt, an earlier turn of a conversation, an
agent's transcript) copies that beginning's keys and values from the pool into its slot and runs only the
rest of its prompt.

- **Pages.** The pool holds pages of `page` tokens (`Plan.pages`, compile/pages.py, allocated once with
  the plan: nothing is allocated while serving; under tensor parallel each rank holds its own heads). A
  page is named by its parent page and its own tokens, so page i stands for exactly tokens 0..(i+1)*page
  of the prompts that share it: a trie with one page per node, compared token for token (no hash can
  collide).
- **Bitwise.** Only for a runner whose rows are independent (the fused decoder, `any_rows`): the KV of
  position p is then a function of tokens 0..p alone, whichever step, chunk or slot computed it, so a
  prefix copied from the pool holds the very bits the request would have computed itself.
- **Eviction.** Least recently used first, and only pages no other page continues (a leaf): a page's
  descendants are unreachable without it, so they leave first.
- **What is stored.** A request's full pages as they fill: its prompt's as each chunk runs (requests running
  at the same time share a system prompt), its output's as it decodes, and at its end whatever of its prompt
  and output its slot holds (an agent's next turn resends that transcript). Stored as they fill, a page is
  one short copy in the step that completes it; stored only at the prompt's end or the request's, a
  1,300-token prompt's 81 pages were one 6 ms copy between two steps, and every stream's next token waited
  for it. A request's `StoreCursor` lets each store continue from its last page.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from metronome.compile.pages import Pages

_ROOT = -1  # the parent of a prompt's first page


@dataclass
class PrefixStats:
    """Counts since the engine started (cumulative; /metrics shows them)."""

    lookups: int = 0  # admitted requests looked up
    lookup_tokens: int = 0  # their prompt tokens
    hit_tokens: int = 0  # prompt tokens copied from the pool instead of computed
    stored_pages: int = 0  # pages copied into the pool
    evicted_pages: int = 0  # pages dropped to make room
    load_s: float = 0.0  # seconds the stepping thread spent copying pages into slots (in the requests' TTFT)
    store_s: float = 0.0  # ... and into the pool (as a request's pages fill, and at its end)


@dataclass
class StoreCursor:
    """How far a request's tokens are stored: its first `pages` full pages, the last of them in pool page
    `last` under `key`, so that its next store starts after them instead of walking the chain from its first
    page. Only a hint: a store that finds `last` holding another key (evicted, or the pool lost) starts over."""

    pages: int = 0
    last: int = _ROOT
    key: tuple[int, tuple[int, ...]] | None = None
    full: bool = False  # a store found no page to free: the request's later pages wait for its end's store


class PrefixCache:
    """Pages of KV keyed by the tokens before them; which page a slot's positions go to or come from.

    Called from the engine's stepping thread only (`peek` excepted: a read that may be stale)."""

    def __init__(self, pages: Pages) -> None:
        self.pool = pages
        self.page = pages.page  # tokens per page
        self.pages = pages.pages
        self._forget()
        self.stats = PrefixStats()

    def _forget(self) -> None:
        """No page holds anything (at the start, and after the pool's contents were lost)."""
        self._generation = self.pool.generation
        self._page_of: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent page, its tokens) -> page
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * self.pages
        self._children = [0] * self.pages
        self._lru: OrderedDict[int, None] = OrderedDict()  # pages in use, least recently used first
        self._free = list(range(self.pages - 1, -1, -1))  # pop() hands out page 0 first

    def _check_pool(self) -> None:
        # A tensor-parallel rank started again has an empty pool: pages copied from it would hold zeros
        # where the rank's heads were, and the request's tokens would change without an error.
        if self.pool.generation != self._generation:
            self._forget()

    @property
    def used_pages(self) -> int:
        return len(self._lru)

    def _chain(self, ids: Sequence[int], pages: int) -> list[int]:
        """The pool pages holding the first `pages` full pages of `ids`, as far as they are cached."""
        chain: list[int] = []
        parent = _ROOT
        for i in range(pages):
            page = self._page_of.get((parent, tuple(ids[i * self.page : (i + 1) * self.page])))
            if page is None:
                break
            chain.append(page)
            parent = page
        return chain

    def _reusable_pages(self, prompt_tokens: int) -> int:
        # the prompt's last token always runs: its row gives the logits of the first output token
        return (prompt_tokens - 1) // self.page

    def peek(self, prompt: Sequence[int]) -> int:
        """Tokens of `prompt` a request admitted now would copy from the pool (no copy, no LRU update)."""
        return len(self._chain(prompt, self._reusable_pages(len(prompt)))) * self.page

    def load(self, prompt: Sequence[int], slot: int) -> int:
        """Copy the longest cached page-aligned beginning of `prompt` (never its last token) into `slot`'s
        positions 0.. and return its length in tokens: the request's prefill starts there."""
        started = time.perf_counter()
        self._check_pool()
        chain = self._chain(prompt, self._reusable_pages(len(prompt)))
        moves = [(page, i * self.page) for i, page in enumerate(chain)]
        if moves and not self.pool.copy(slot, moves, into_pool=False, generation=self._generation):
            self._forget()  # lost since the check above (a rank failed meanwhile): the prompt runs whole
            chain = []
        self._touch(chain)
        tokens = len(chain) * self.page
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(prompt)
        self.stats.hit_tokens += tokens
        self.stats.load_s += time.perf_counter() - started
        return tokens

    def store(self, ids: Sequence[int], slot: int, valid: int, cursor: StoreCursor | None = None) -> int:
        """Keep the full pages of `ids[:valid]`, whose KV `slot` holds at positions 0..valid-1, in the pool
        (pages already there are only marked used). Stops early when no page can be freed. Returns the
        pages newly stored. With a `cursor` (the same request's earlier stores of these tokens), it starts
        after the pages the cursor holds and moves the cursor to the last page stored."""
        started = time.perf_counter()
        self._check_pool()
        first, parent = 0, _ROOT
        if cursor is not None and cursor.pages and self._key[cursor.last] == cursor.key:
            first, parent = cursor.pages, cursor.last  # pages before it are its ancestors: never evicted first
        done, moves = first, []
        for i in range(first, min(valid, len(ids)) // self.page):
            lo = i * self.page
            key = (parent, tuple(ids[lo : lo + self.page]))
            page = self._page_of.get(key)
            if page is None:
                page = self._take_page(keep=parent)
                if page is None:  # every page in use continues another, or is the one continued here
                    if cursor is not None:
                        cursor.full = True
                    break
                moves.append((page, lo))
                self._page_of[key], self._key[page] = page, key
                if parent != _ROOT:
                    self._children[parent] += 1
            self._lru[page] = None
            self._lru.move_to_end(page)
            parent, done = page, i + 1
        # one copy for all of them (one call on every rank under tensor parallel)
        try:
            copied = not moves or self.pool.copy(slot, moves, into_pool=True, generation=self._generation)
        except BaseException:
            self._forget()  # the pages recorded above were never written: none may be loaded
            raise
        if not copied:
            self._forget()
            moves = []
        elif cursor is not None and done > first:
            cursor.pages, cursor.last, cursor.key = done, parent, self._key[parent]
        stored = len(moves)
        self.stats.stored_pages += stored
        self.stats.store_s += time.perf_counter() - started
        return stored

    def _touch(self, chain: list[int]) -> None:
        for page in chain:
            self._lru.move_to_end(page)

    def _take_page(self, keep: int) -> int | None:
        """A free page, else the least recently used leaf page (never `keep`, the page being continued)."""
        if self._free:
            return self._free.pop()
        for page in self._lru:
            if self._children[page] == 0 and page != keep:
                break
        else:
            return None
        del self._lru[page]
        key = self._key[page]
        assert key is not None  # a page in the LRU order always has its key
        del self._page_of[key]
        self._key[page] = None
        if key[0] != _ROOT:
            self._children[key[0]] -= 1
        self.stats.evicted_pages += 1
        return page

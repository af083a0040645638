"""The automatic prefix cache: a prompt served from cached pages gives bitwise the tokens and logprobs of the
same prompt computed from scratch; pages are evicted least recently used first; a pool too small stays out of
the way; the cache is off where prompts cannot start at a cached position (the torch runner)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metronome.compile.pages import PagePool
from metronome.compile.plan import PREFIX_PAGE_TOKENS
from metronome.compile.probe import DEFAULT_PREFILL_CHUNK
from metronome.config import EngineConfig, ModelConfig, ParamError, SamplingParams
from metronome.engine import Engine
from metronome.engine.prefix_cache import PrefixCache, StoreCursor
from metronome.model.loader import load
from metronome.model.transformer import KVCache

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=3)
SAMPLED = SamplingParams(
    max_tokens=8, temperature=0.9, top_p=0.95, top_k=40, seed=77, logprobs=True, top_logprobs=3, ignore_eos=True
)
P = PREFIX_PAGE_TOKENS


def _trace(req) -> tuple:
    return tuple((c.token, c.logprob, c.top) for c in req.choices)


def _run(engine: Engine, prompt: list[int], params: SamplingParams):
    req = engine.submit(prompt, params)
    while req.finish_reason is None:
        engine.step()
    return req


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(5, vocab, (n - 1,), generator=g).tolist()


# -- the pool's bookkeeping, on bare tensors -----------------------------------------------------------

TINY_SHAPE = ModelConfig("llama", 32, 8, 16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, max_position=64)


def _pool(pages: int, page: int = 4) -> tuple[KVCache, PrefixCache]:
    cache = KVCache.allocate(TINY_SHAPE, 2, 32, torch.float32, "cpu")
    return cache, PrefixCache(PagePool(cache, KVCache.allocate(TINY_SHAPE, pages, page, torch.float32, "cpu")))


def _fill(cache: KVCache, slot: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cache.k[:, slot] = torch.randn(cache.k[:, slot].shape, generator=g)
    cache.v[:, slot] = torch.randn(cache.v[:, slot].shape, generator=g)


def test_pages_copy_both_ways_and_only_full_pages_before_the_last_prompt_token():
    cache, pc = _pool(pages=8)
    _fill(cache, 0, seed=1)
    ids = list(range(1, 14))  # 13 tokens: 3 full pages of 4
    assert pc.store(ids, slot=0, valid=13) == 3
    assert pc.store(ids, slot=0, valid=13) == 0  # already there: only marked used
    # a prompt of exactly 12 tokens reuses 2 pages: its last token must run to give the first logits
    assert pc.peek(ids[:12]) == 8 and pc.peek(ids) == 12 and pc.peek([9, *ids[1:]]) == 0
    assert pc.load(ids + [99], slot=1) == 12
    torch.testing.assert_close(cache.k[:, 1, :, :12], cache.k[:, 0, :, :12], rtol=0, atol=0)
    torch.testing.assert_close(cache.v[:, 1, :, :12], cache.v[:, 0, :, :12], rtol=0, atol=0)
    assert pc.stats.hit_tokens == 12 and pc.stats.lookup_tokens == 14 and pc.stats.stored_pages == 3


def test_a_page_stands_for_every_token_before_it():
    """The same page of tokens after a different beginning is another page (a trie, not a bag of pages)."""
    cache, pc = _pool(pages=8)
    pc.store([1, 2, 3, 4, 5, 6, 7, 8], slot=0, valid=8)
    assert pc.peek([9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0
    assert pc.peek([1, 2, 3, 4, 5, 6, 7, 9, 0]) == 4
    # a cached first page later in a prompt is not its beginning: the chain stops at the first page missing
    assert pc.peek([9, 9, 9, 9, 1, 2, 3, 4, 0]) == 0


def test_least_recently_used_leaves_are_evicted_first():
    cache, pc = _pool(pages=3)
    a, b, c = [1, 1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]
    pc.store(a, 0, 8)  # pages a0 -> a1
    pc.store(b, 0, 4)  # b0: the pool is full
    assert pc.load(a + [0], 1) == 8  # a used again: b0 is now the least recently used
    pc.store(c, 0, 4)
    assert pc.peek(b + [0]) == 0 and pc.peek(a + [0]) == 8 and pc.peek(c + [0]) == 4
    assert pc.stats.evicted_pages == 1
    # a0 is now the least recently used page, but a1 continues it: the leaf a1 goes first
    pc.load(c + [0], 1)
    pc.store([5, 5, 5, 5], 0, 4)
    assert pc.peek(a + [0]) == 4 and pc.peek(c + [0]) == 4


def test_storing_pages_already_there_marks_them_used():
    """A prompt stored again (a second request with the same beginning) makes its pages the most recently
    used: the next eviction takes another page, not the one just used."""
    cache, pc = _pool(pages=2)
    a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    pc.store(a, 0, 4)
    pc.store(b, 0, 4)
    assert pc.store(a, 0, 4) == 0  # already there
    pc.store(c, 0, 4)
    assert pc.peek(a + [0]) == 4 and pc.peek(b + [0]) == 0 and pc.peek(c + [0]) == 4


def test_a_page_whose_continuation_was_evicted_is_a_leaf_again():
    """Evicting a page's only continuation makes the page evictable: it then goes before pages used later,
    least recently used first, instead of counting a child it no longer has."""
    cache, pc = _pool(pages=2)
    a = [1, 1, 1, 1, 2, 2, 2, 2]
    pc.store(a, 0, 8)  # a0 -> a1
    pc.store([3, 3, 3, 3], 0, 4)  # evicts the leaf a1
    pc.store([4, 4, 4, 4], 0, 4)  # a0 is now the least recently used leaf
    assert pc.peek(a + [0]) == 0 and pc.peek([3, 3, 3, 3, 0]) == 4 and pc.peek([4, 4, 4, 4, 0]) == 4
    assert pc.stats.evicted_pages == 2


class _CountingPool(PagePool):
    """A pool that records the moves of every copy into it."""

    def copy(self, slot, moves, into_pool, generation=0) -> bool:
        if into_pool:
            self.copies.append(list(moves))
        return super().copy(slot, moves, into_pool, generation)


def test_a_cursor_stores_only_the_pages_after_it_and_starts_over_once_its_last_page_was_evicted():
    """A request's stores continue from its cursor (copying only the new pages, without walking its chain
    again); where its last page went to another prompt meanwhile, the store starts from the first page, and
    the chain it leaves is the request's own (continued from the other prompt's page, it was unreachable)."""
    cache, pc = _pool(pages=3)
    pc.pool.__class__, pc.pool.copies = _CountingPool, []
    _fill(cache, 0, seed=3)
    a, cursor = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], StoreCursor()
    assert pc.store(a, 0, 4, cursor) == 1 and cursor.pages == 1
    assert pc.store(a, 0, 8, cursor) == 1 and cursor.pages == 2
    assert pc.pool.copies == [[(0, 0)], [(1, 4)]]  # the second store copied its new page only
    pc.store([4, 4, 4, 4], 0, 4)  # the pool is full
    pc.store([5, 5, 5, 5], 0, 4)  # evicts the least recently used leaf, a's second page, and takes its place
    assert cursor.last == 1 and pc.peek(a + [0]) == 4
    assert pc.store(a, 0, 12, cursor) == 2 and cursor.pages == 3
    assert pc.peek(a + [0]) == 12


def test_a_pool_too_small_for_a_prompt_keeps_its_beginning():
    cache, pc = _pool(pages=1)
    cursor = StoreCursor()
    assert pc.store(list(range(12)), 0, 12, cursor) == 1  # its second page would have to evict its own first
    assert pc.peek(list(range(12))) == 4 and pc.used_pages == 1
    assert cursor.pages == 1 and cursor.full  # the engine stops storing the request's pages until its end


def test_prefix_cache_tokens_is_checked():
    with pytest.raises(ParamError, match="prefix_cache_tokens"):
        EngineConfig(prefix_cache_tokens=-1)


# -- engines on tiny random models: bitwise against no cache --------------------------------------------


# gemma3: sliding-window layers (window 8); int8: the KV cache's rows as bytes and scales, copied as they are
@pytest.fixture(scope="module", params=[("llama", "auto"), ("gemma3", "auto"), ("llama", "int8")], ids=str)
def engines(request, tiny_hf):
    arch, kv = request.param
    loaded = load(tiny_hf(arch))
    base = dict(slots=4, ctx=256, weights="int8", kv_cache=kv)
    cached = Engine.from_model(config=EngineConfig(**base, prefix_cache_tokens=1024), loaded=loaded)
    plain = Engine.from_model(config=EngineConfig(**base, prefix_cache_tokens=0), loaded=loaded)
    assert cached.prefix_cache is not None and plain.prefix_cache is None
    return cached, plain, loaded.config.vocab_size


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_prompt_served_from_cache_is_bitwise_the_one_computed(engines, params):
    cached, plain, vocab = engines
    prompt = _prompt(seed=len(params.stop) + int(params.temperature * 10), n=77, vocab=vocab)
    first = _run(cached, prompt, params)
    again = _run(cached, prompt, params)
    scratch = _run(plain, prompt, params)
    assert first.cached_tokens == 0 and again.cached_tokens == (77 - 1) // P * P
    assert _trace(again) == _trace(scratch) == _trace(first)
    # the copied KV itself: bit for bit what the plain engine computed in its slot
    n = again.cached_tokens
    assert torch.equal(cached.plan.cache.k[:, again.slot, :, :n], plain.plan.cache.k[:, scratch.slot, :, :n])


def test_a_prompt_that_asks_for_its_logprobs_is_computed_not_copied(engines):
    """Prompt logprobs need every prompt row's logits: a cached beginning is run again, not copied, and its
    scores are the uncached engine's."""
    cached, plain, vocab = engines
    prompt = _prompt(seed=11, n=77, vocab=vocab)
    _run(cached, prompt, GREEDY)  # now in the cache
    scored = dataclasses.replace(GREEDY, prompt_logprobs=True, top_logprobs=2, logprobs=True)
    again, scratch = _run(cached, prompt, scored), _run(plain, prompt, scored)
    assert again.cached_tokens == 0 and len(again.prompt_choices) == 76
    assert again.prompt_choices == scratch.prompt_choices and _trace(again) == _trace(scratch)


def test_prompts_sharing_a_system_prompt_while_others_decode(engines):
    """One request computes the shared beginning; the ones arriving while it decodes copy it, their rows
    running in chunks beside its decode rows; each matches its own run on the plain engine."""
    cached, plain, vocab = engines
    system = _prompt(seed=5, n=50, vocab=vocab)
    prompts = [system + _prompt(seed=10 + i, n=6 + 5 * i, vocab=vocab)[1:] for i in range(4)]
    params = [SAMPLED if i % 2 else GREEDY for i in range(4)]
    first = cached.submit(prompts[0], params[0])
    cached.step()
    cached.step()  # its prompt is in: the shared pages are pooled
    rest = [cached.submit(p, s) for p, s in zip(prompts[1:], params[1:])]
    while not cached.scheduler.idle:
        cached.step()
    for req, p, s in zip([first, *rest], prompts, params):
        assert _trace(req) == _trace(_run(plain, p, s))
    assert [r.cached_tokens for r in rest] == [48, 48, 48]


def test_pages_are_pooled_as_they_fill_a_page_or_two_a_step(engines):
    """A prompt's pages go to the pool as its chunks run beside a decoding request, and that request's
    output pages as it decodes: no copy holds more pages than one step fills. Pooled only once the prompt
    was in, a long prompt's pages were one copy between two steps (6 ms for 1,300 tokens of SmolLM2), which
    every stream's next token waited for. The pages hold the KV the request computed: a prompt served from
    them gives the uncached engine's tokens."""
    cached, plain, vocab = engines
    pool = cached.prefix_cache.pool
    pool.__class__, pool.copies = _CountingPool, []
    try:
        streaming = cached.submit(_prompt(seed=31, n=20, vocab=vocab), dataclasses.replace(GREEDY, max_tokens=120))
        cached.step()
        prompt = _prompt(seed=32, n=150, vocab=vocab)
        arriving = cached.submit(prompt, GREEDY)
        while arriving.prefilled < len(prompt):
            cached.step()
            assert cached.prefix_cache.peek(prompt) == min(arriving.prefilled, len(prompt) - 1) // P * P
            assert streaming.finish_reason is None  # decoding beside the chunks
        while streaming.finish_reason is None:
            seen = streaming.prompt_ids + streaming.output_ids
            assert cached.prefix_cache.peek(seen) == streaming.position // P * P
            cached.step()
        assert max(len(moves) for moves in pool.copies) <= -(-DEFAULT_PREFILL_CHUNK // P)
        again = _run(cached, prompt, GREEDY)
    finally:
        pool.__class__ = PagePool
    assert again.cached_tokens == (150 - 1) // P * P
    assert _trace(again) == _trace(arriving) == _trace(_run(plain, prompt, GREEDY))


# (prompt, reply) lengths: 45 + 8 - 1 tokens in the cache fill 3 pages; 40 + 24 = 64 ends on a page boundary,
# and the reply's last token (sampled, never run) is the one that would complete the 4th page
@pytest.mark.parametrize("turn1_tokens, reply_tokens", [(45, 8), (40, 24)])
def test_the_next_turn_reuses_the_transcript_prompt_and_reply(engines, turn1_tokens, reply_tokens):
    cached, plain, vocab = engines
    turn1 = _prompt(seed=21, n=turn1_tokens, vocab=vocab)
    reply = _run(cached, turn1, dataclasses.replace(SAMPLED, max_tokens=reply_tokens))
    turn2 = turn1 + reply.output_ids + _prompt(seed=22, n=9, vocab=vocab)[1:]
    second = _run(cached, turn2, GREEDY)
    # the reply's KV was pooled when it ended: everything up to its last (never run) token, in full pages
    assert second.cached_tokens == (turn1_tokens + reply_tokens - 1) // P * P > len(turn1)
    assert _trace(second) == _trace(_run(plain, turn2, GREEDY))


def _priced_rows(engine, prompt, params):
    """(the (first row, rows) each TTFT prediction was given, the finished request) of one run. An
    uncalibrated plan predicts NaN: the prompt rows the prediction is given are what the tests compare."""
    seen = []
    predict = engine._predict_ttft_ms
    engine._predict_ttft_ms = lambda start, tokens: seen.append((start, tokens)) or predict(start, tokens)
    try:
        return seen, _run(engine, prompt, params)
    finally:
        del engine._predict_ttft_ms


def test_predicted_ttft_counts_only_the_rows_that_still_run(engines):
    cached, _plain, vocab = engines
    prompt = _prompt(seed=31, n=120, vocab=vocab)
    _run(cached, prompt, GREEDY)
    assert cached.prefix_cache.peek(prompt) == 112
    seen, _ = _priced_rows(cached, prompt, GREEDY)
    assert seen == [(112, 120 - 112)]  # the rows still to run, from where the cached ones end


def test_a_prompt_that_asks_for_its_logprobs_is_priced_as_run_whole(engines):
    """Its cached beginning runs again (it is computed, not copied): its promised TTFT counts every prompt
    row from the first, not only the rows past the cached pages."""
    cached, _plain, vocab = engines
    prompt = _prompt(seed=35, n=120, vocab=vocab)
    _run(cached, prompt, GREEDY)
    assert cached.prefix_cache.peek(prompt) == 112
    seen, scored = _priced_rows(cached, prompt, dataclasses.replace(GREEDY, prompt_logprobs=True))
    assert seen == [(0, 120)] and scored.cached_tokens == 0


def test_the_queue_ahead_counts_only_its_uncached_rows(engines):
    """Requests queued ahead found their prompts' beginnings in the prefix cache at submit: a prediction
    behind them counts only the rows they still run (it counted their whole prompts, and over-predicted
    users who arrive together with a shared system prompt)."""
    cached, _plain, vocab = engines
    prompt = _prompt(seed=33, n=120, vocab=vocab)
    _run(cached, prompt, GREEDY)
    seen = []

    class Recorder:  # stands in for the plan's report while the two requests are submitted
        def ttft_ms(self, prompts, decoding, chunk, alone_chunk, position=None, slack_ms=None):
            seen.append(list(prompts))
            return 0.0

    report, cached.plan.report = cached.plan.report, Recorder()
    try:
        reqs = [cached.submit(prompt, GREEDY), cached.submit(prompt, GREEDY)]
    finally:
        cached.plan.report = report
    while any(r.finish_reason is None for r in reqs):
        cached.step()
    assert seen == [[(112, 8)], [(112, 8), (112, 8)]]


def test_a_prompt_just_given_a_slot_is_priced_from_its_cached_beginning_and_in_its_turn(engines):
    """The stepping thread gives waiting requests their slots under the engine's lock, then, outside it,
    stamps them admitted and copies in their cached beginnings. A submit in between priced such a prompt
    from token 0 and behind every other prompt (its `admitted` read as 0): a burst's later promises
    counted the first prompt twice over."""
    cached, _plain, vocab = engines
    prompt = _prompt(seed=34, n=120, vocab=vocab)
    _run(cached, prompt, GREEDY)
    decoding = cached.submit(_prompt(seed=35, n=5, vocab=vocab), GREEDY)
    cached.step()
    earlier = cached.submit(_prompt(seed=36, n=150, vocab=vocab), GREEDY)  # admitted before `first`
    cached.step()  # beside the decode row, its first chunk (32 rows: the plan is not calibrated)
    assert earlier.timings.admitted is not None and earlier.prefilled == 32
    first = cached.submit(prompt, GREEDY)
    with cached._lock:
        cached.scheduler.schedule()  # the step's admission, caught before its stamp and its copy
    assert first.slot is not None and first.timings.admitted is None and first.prefilled == 0
    seen = []

    class Recorder:
        def ttft_ms(self, prompts, decoding, chunk, alone_chunk, position=None, slack_ms=None):
            seen.append(list(prompts))
            return 0.0

    report, cached.plan.report = cached.plan.report, Recorder()
    try:
        second = cached.submit(prompt, GREEDY)
    finally:
        cached.plan.report = report
    while any(r.finish_reason is None for r in (decoding, earlier, first, second)):
        cached.step()
    assert seen == [[(32, 118), (112, 8), (112, 8)]]


def test_a_pool_smaller_than_a_page_is_no_pool(tiny_hf):
    e = Engine.from_model(
        config=EngineConfig(slots=2, ctx=64, prefix_cache_tokens=P - 1), loaded=load(tiny_hf("llama"))
    )
    assert e.prefix_cache is None and e.plan.report.prefix_cache_bytes == 0
    assert "fewer tokens than a page" in e.plan.report.prefix_cache_note


def test_the_torch_runner_has_no_prefix_cache(tiny_hf):
    e = Engine.from_model(
        config=EngineConfig(slots=2, ctx=64, weights="f32", kernels="torch"), loaded=load(tiny_hf("llama"))
    )
    assert e.prefix_cache is None and "fused decoder" in e.plan.report.prefix_cache_note
    req = _run(e, _prompt(seed=1, n=20, vocab=e.plan.cfg.vocab_size), GREEDY)
    assert req.cached_tokens == 0 and len(req.output_ids) == GREEDY.max_tokens


# -- the shipped model, end to end ---------------------------------------------------------------------


def test_smollm_chat_turns_from_cache_match_scratch(smollm):
    base = dict(slots=2, ctx=512)
    cached = Engine.from_model(config=EngineConfig(**base, prefix_cache_tokens=2048), loaded=smollm)
    plain = Engine.from_model(config=EngineConfig(**base, prefix_cache_tokens=0), loaded=smollm)
    tok = cached.tokenizer
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    turn1 = [system, {"role": "user", "content": "Name a color."}]
    p1 = tok.encode_chat(turn1)
    reply = _run(cached, p1, SAMPLED)
    turn2 = [*turn1, {"role": "assistant", "content": tok.decode(reply.output_ids)}]
    p2 = tok.encode_chat([*turn2, {"role": "user", "content": "Another one?"}])
    second = _run(cached, p2, SAMPLED)
    assert second.cached_tokens >= len(p1) // P * P > 0
    assert _trace(second) == _trace(_run(plain, p2, SAMPLED))
    assert second.cached_tokens == cached.prefix_cache.stats.hit_tokens


class _LostPool(PagePool):
    """A pool whose contents are lost as a copy starts (a tensor-parallel rank failed meanwhile)."""

    def copy(self, slot, moves, into_pool, generation=0) -> bool:
        return into_pool and super().copy(slot, moves, into_pool, generation)


def test_a_copy_from_a_lost_pool_forgets_every_page_and_the_prompt_runs_whole():
    cache = KVCache.allocate(TINY_SHAPE, 2, 32, torch.float32, "cpu")
    pc = PrefixCache(_LostPool(cache, KVCache.allocate(TINY_SHAPE, 8, 4, torch.float32, "cpu")))
    _fill(cache, 0, seed=1)
    ids = list(range(1, 14))
    assert pc.store(ids, slot=0, valid=13) == 3 and pc.peek(ids) == 12
    before = cache.k[:, 1].clone()
    assert pc.load(ids, slot=1) == 0
    assert pc.peek(ids) == 0 and pc.used_pages == 0 and pc.stats.hit_tokens == 0
    assert torch.equal(cache.k[:, 1], before)


class _FailingPool(PagePool):
    """A pool whose next copy into it raises, as a tensor-parallel rank failing mid-copy makes it do."""

    fail_next = False

    def copy(self, slot, moves, into_pool, generation=0) -> bool:
        if into_pool and self.fail_next:
            self.fail_next = False
            raise RuntimeError("a rank failed during the copy")
        return super().copy(slot, moves, into_pool, generation)


def test_a_copy_that_raises_records_no_page():
    """store() recorded its pages before the copy: a copy that raised left them standing for pages never
    written, and the next prompt with that beginning loaded garbage (96 cached tokens, other tokens)."""
    cache = KVCache.allocate(TINY_SHAPE, 2, 32, torch.float32, "cpu")
    pool = _FailingPool(cache, KVCache.allocate(TINY_SHAPE, 8, 4, torch.float32, "cpu"))
    pc = PrefixCache(pool)
    _fill(cache, 0, seed=1)
    ids = list(range(1, 14))
    pool.fail_next = True
    with pytest.raises(RuntimeError, match="rank failed"):
        pc.store(ids, slot=0, valid=13)
    assert pc.peek(ids) == 0 and pc.used_pages == 0
    assert pc.store(ids, slot=0, valid=13) == 3 and pc.peek(ids) == 12  # and the pool works on


def test_every_cancelled_request_ends_when_pooling_one_of_them_fails(tiny_hf):
    """Cancelled requests leave their slots before they end; pooling the first one's pages raised and the
    others never got their end (a generate() on one waited for ever)."""
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(
        config=EngineConfig(slots=3, ctx=256, weights="int8", prefix_cache_tokens=1024), loaded=loaded
    )
    pool = engine.prefix_cache.pool
    pool.__class__ = _FailingPool
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    reqs = [engine.submit(_prompt(60 + i, 40, loaded.config.vocab_size), params) for i in range(3)]
    for _ in range(30):  # past the prompts' pages: each holds new full pages to pool
        engine.step()
    assert all(r.finish_reason is None and len(r.output_ids) > 16 for r in reqs)
    # their full pages are pooled as they fill: forgotten, each request's end has all of them to pool again
    engine.prefix_cache._forget()
    for r in reqs:
        engine.cancel(r)
    pool.fail_next = True
    with pytest.raises(RuntimeError, match="rank failed"):
        engine.step()
    assert [r.finish_reason for r in reqs] == ["cancelled"] * 3
    engine.step()
    assert engine.scheduler.idle


class _LostOnStorePool(PagePool):
    """A pool whose contents are lost as a copy into it starts (copy returns False: nothing copied)."""

    def copy(self, slot, moves, into_pool, generation=0) -> bool:
        return not into_pool and super().copy(slot, moves, into_pool, generation)


def test_a_store_into_a_lost_pool_records_no_page():
    """A copy into the pool that reports the pool lost stored nothing: no page may be counted, found or
    loaded (they would hold whatever was there before)."""
    cache = KVCache.allocate(TINY_SHAPE, 2, 32, torch.float32, "cpu")
    pc = PrefixCache(_LostOnStorePool(cache, KVCache.allocate(TINY_SHAPE, 8, 4, torch.float32, "cpu")))
    _fill(cache, 0, seed=1)
    ids = list(range(1, 14))
    assert pc.store(ids, slot=0, valid=13) == 0
    assert pc.peek(ids) == 0 and pc.used_pages == 0 and pc.stats.stored_pages == 0
    assert pc.load(ids, slot=1) == 0


class _RestartedPool(PagePool):
    """A pool that is lost and started again empty (a tensor-parallel rank replaced): its generation moves
    on, and a copy asked for at an older generation does nothing."""

    generation = 0

    def copy(self, slot, moves, into_pool, generation=0) -> bool:
        return generation == self.generation and super().copy(slot, moves, into_pool, generation)


def test_pages_of_a_pool_that_started_again_are_forgotten_and_stored_anew():
    """When the pool's generation changes, every page the cache knew of is gone: the next store copies the
    pages again (it does not take them as already there) and a later prompt loads them."""
    cache = KVCache.allocate(TINY_SHAPE, 2, 32, torch.float32, "cpu")
    pool = _RestartedPool(cache, KVCache.allocate(TINY_SHAPE, 8, 4, torch.float32, "cpu"))
    pc = PrefixCache(pool)
    _fill(cache, 0, seed=1)
    ids = list(range(1, 14))
    assert pc.store(ids, slot=0, valid=13) == 3
    pool.generation = 1
    assert pc.store(ids, slot=0, valid=13) == 3  # stored again, into the new pool
    assert pc.load(ids, slot=1) == 12
    torch.testing.assert_close(cache.k[:, 1, :, :12], cache.k[:, 0, :, :12], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [{"num_layers": 3}, {"num_kv_heads": 2}, {"head_dim": 8}, {"dtype": torch.bfloat16}],
    ids=["layers", "kv_heads", "head_dim", "dtype"],
)
def test_a_pool_of_another_shape_than_the_cache_is_refused(change):
    """A page copies a slot's rows as they are: a pool with other layers, KV heads, head size or dtype than
    the KV cache is refused when made; its byte count is its keys' and values'."""
    cache = KVCache.allocate(TINY_SHAPE, 2, 32, torch.float32, "cpu")
    dtype = change.pop("dtype", torch.float32)
    other = dataclasses.replace(TINY_SHAPE, **change)
    with pytest.raises(ValueError, match="does not match the KV cache"):
        PagePool(cache, KVCache.allocate(other, 4, 4, dtype, "cpu"))
    pool = PagePool.allocate(cache, pages=4, page=4)
    assert pool.nbytes() == pool.pool.k.nbytes + pool.pool.v.nbytes == 2 * 2 * 4 * 1 * 4 * 4 * 4

"""The engine: the determinism contract, continuous batching, sampling, stops, streaming, refusals."""

from __future__ import annotations

import dataclasses
import random
import shutil
import time

import pytest
import torch

from metronome.compile.fused import PREFILL_CHUNK, FusedRunner
from metronome.compile.probe import DEFAULT_PREFILL_CHUNK
from metronome.config import EngineConfig, ParamError, SamplingParams
from metronome.engine import Engine, RequestError

SAMPLED = SamplingParams(
    max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, logprobs=True, top_logprobs=3, ignore_eos=True
)
OTHERS = [
    SamplingParams(max_tokens=n, temperature=t, seed=s, ignore_eos=True, frequency_penalty=0.3)
    for n, t, s in [(5, 0.0, 1), (9, 1.0, 2), (3, 0.7, 3), (14, 1.3, 4), (7, 0.0, 5), (11, 0.5, 6), (4, 1.0, 7)]
]


def _trace(engine: Engine, req) -> tuple:
    """Everything the contract covers: tokens, chosen logprobs and top alternatives, bit for bit."""
    return tuple((c.token, c.logprob, c.top) for c in req.choices)


def _run_alone(engine: Engine, prompt: list[int], params: SamplingParams, slot_fillers: int = 0) -> tuple:
    """Run `prompt` (after `slot_fillers` requests take the lower slots, so that it lands in slot k)."""
    fillers = [engine.submit([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True)) for _ in range(slot_fillers)]
    if fillers:
        engine.step()  # fillers take slots 0..k-1
    req = engine.submit(prompt, params)
    engine.step()  # the target takes slot k
    for f in fillers:  # then the fillers leave
        engine.cancel(f)
    while req.finish_reason is None:
        engine.step()
    return req.slot, _trace(engine, req)


def _run_crowded(
    engine: Engine,
    prompt: list[int],
    params: SamplingParams,
    others: list[tuple[list[int], SamplingParams]],
    arrivals: list[int],
) -> tuple:
    """Run `prompt` while the others arrive at the given steps and leave when done."""
    req = None
    pending = sorted(zip(arrivals, range(len(others))))
    step = 0
    while req is None or req.finish_reason is None or pending:
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            engine.submit(*others[i])
        if req is None and step == 2:
            req = engine.submit(prompt, params)
        engine.step()
        step += 1
    while not engine.scheduler.idle:
        engine.step()
    return _trace(engine, req)


# Every execution path of a CPU plan: (weights, kernels) -> (fused decoder?, decode shape)
PATHS = {
    "int4-fused": ("int4", "auto", True, "compact"),  # the default: packed Q4 blocks, int8 activations
    "int8-fused": ("int8", "auto", True, "compact"),  # Q8_0 blocks, float32 activations
    "int4-torch": ("int4", "torch", False, "compact"),  # torch's int4pack kernel (row-count invariant)
    "f32-torch": ("f32", "auto", False, "fixed"),  # MKL float32: not row-count invariant, so a fixed shape
}


@pytest.fixture(scope="module", params=list(PATHS))
def engine(request, smollm):
    weights, kernels, _, _ = PATHS[request.param]
    e = Engine.from_model(config=EngineConfig(slots=8, ctx=256, weights=weights, kernels=kernels), loaded=smollm)
    e.path = request.param
    return e


# The remaining CPU paths, on tiny random models (SmolLM2 in torch int8 takes long to pack):
# (model, weights, kernels) -> (fused decoder?, kernels named in the report)
TINY_PATHS = {
    "bf16-torch": ("llama", "bf16", "torch", False, "torch"),
    "int8-torch": ("llama", "int8", "torch", False, "torch"),
    "bf16-cpp": ("llama", "bf16", "auto", False, "cpp (the fused decoder runs block-quantized weights"),
    # hidden 48 (not a multiple of 32): the fused decoder refuses it, so the C++ ops run the Q8 matrices unfused
    "int8-cpp-unfused": ("odd", "int8", "cpp", False, "cpp (the fused decoder needs multiples of 32"),
}


@pytest.fixture(scope="module")
def odd_llama(tiny_hf, tmp_path_factory):
    """A tiny llama whose sizes the fused decoder cannot take (hidden 48: not whole 32-blocks; head_dim 16)."""
    import transformers as T

    base = tiny_hf("llama")
    config = T.LlamaConfig(
        vocab_size=T.AutoConfig.from_pretrained(base).vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=3,
        num_key_value_heads=1,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(99)
    folder = tmp_path_factory.mktemp("tiny-odd")
    T.LlamaForCausalLM(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, folder / name)
    return folder


@pytest.fixture(scope="module", params=list(TINY_PATHS))
def tiny_engine(request, tiny_hf, odd_llama):
    from metronome.model.loader import load

    arch, weights, kernels, _, _ = TINY_PATHS[request.param]
    loaded = load(odd_llama if arch == "odd" else tiny_hf(arch))
    e = Engine.from_model(config=EngineConfig(slots=8, ctx=256, weights=weights, kernels=kernels), loaded=loaded)
    e.path = request.param
    return e


def test_each_path_is_what_it_claims(engine):
    _, _, fused, mode = PATHS[engine.path]
    assert (isinstance(engine.plan.runner, FusedRunner)) == fused, engine.plan.report.kernels
    assert engine.plan.decode_mode == mode, engine.plan.report.invariance


def test_each_tiny_path_is_what_it_claims(tiny_engine):
    _, weights, _, fused, kernels = TINY_PATHS[tiny_engine.path]
    assert isinstance(tiny_engine.plan.runner, FusedRunner) == fused
    assert tiny_engine.plan.report.kernels.startswith(kernels), tiny_engine.plan.report.kernels
    assert tiny_engine.plan.report.weights == weights


def test_determinism_contract_on_the_other_paths(tiny_engine):
    engine = tiny_engine
    prompt = engine.encode_prompt("tell me about the sun and the moon")
    others = [
        (engine.encode_prompt(t), p)
        for t, p in zip(["hello", "the cat", "red green blue", "a dog", "one two", "why", "yes"], OTHERS)
    ]
    _, first = _run_alone(engine, prompt, SAMPLED)
    assert len(first) == SAMPLED.max_tokens
    assert _run_crowded(engine, prompt, SAMPLED, others, arrivals=[0, 0, 1, 3, 4, 6, 9]) == first
    for k in (3, 7):
        slot, trace = _run_alone(engine, prompt, SAMPLED, slot_fillers=k)
        assert slot == k and trace == first, f"slot {k}"


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        max_tokens=rng.randint(1, 12),
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        seed=rng.randrange(2**31),
        top_k=rng.choice([0, 0, 5, 40]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        frequency_penalty=rng.choice([0.0, 0.4]),
        presence_penalty=rng.choice([0.0, -0.3]),
        repetition_penalty=rng.choice([1.0, 1.3]),
        logit_bias=rng.choice([(), ((5, -100.0),), ((7, 2.5), (11, -1.0))]),
        logprobs=True,
        top_logprobs=rng.randint(0, 4),
        ignore_eos=True,
    )


def test_random_scenarios_equal_each_request_run_alone(tiny_hf):
    """Property: whatever arrives when, each request's tokens and logprobs are those it gets alone."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=128), loaded=load(tiny_hf("llama")))
    rng = random.Random(20240611)
    vocab = engine.tokenizer.vocab_size
    for scenario in range(8):
        n = rng.randint(2, 8)
        reqs = [
            (
                [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 24))],
                _random_params(rng),
                rng.randint(0, 10),
            )
            for _ in range(n)
        ]
        submitted, step = {}, 0
        while len(submitted) < n or not engine.scheduler.idle:
            for i, (prompt, params, at) in enumerate(reqs):
                if at == step:
                    submitted[i] = engine.submit(prompt, params)
            engine.step()
            step += 1
        for i, (prompt, params, _) in enumerate(reqs):
            alone = engine.submit(prompt, params)
            while alone.finish_reason is None:
                engine.step()
            assert _trace(engine, submitted[i]) == _trace(engine, alone), f"scenario {scenario}, request {i}"
            assert len(alone.choices) == params.max_tokens


def test_determinism_contract(engine):
    tok = engine.tokenizer
    prompt = engine.encode_prompt("Tell me a short story about a lighthouse.")
    others = [
        (engine.encode_prompt(t), p)
        for t, p in zip(
            ["Hi", "Count to ten.", "What is 2+2?", "Name a fruit.", "Describe rain.", "Why?", "Say yes."], OTHERS
        )
    ]
    # (a) the same request twice
    slot_a, first = _run_alone(engine, prompt, SAMPLED)
    _, second = _run_alone(engine, prompt, SAMPLED)
    assert first == second and len(first) == SAMPLED.max_tokens
    assert slot_a == 0
    # (b) alone vs sharing the batch with 7 different requests that start at arbitrary steps
    crowded = _run_crowded(engine, prompt, SAMPLED, others, arrivals=[0, 0, 1, 3, 4, 6, 9])
    assert crowded == first
    crowded_again = _run_crowded(engine, prompt, SAMPLED, others, arrivals=[5, 2, 0, 7, 1, 3, 3])
    assert crowded_again == first
    # (c) in any slot
    for k in (1, 4, 7):
        slot, trace = _run_alone(engine, prompt, SAMPLED, slot_fillers=k)
        assert slot == k and trace == first, f"slot {k}"
    assert tok.decode([t for t, _, _ in first])  # real text came out


def test_greedy_batch_is_the_greedy_alone(engine):
    prompts = ["The sun is", "My favourite food is", "Once upon a time", "1, 2, 3,"]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = [engine.generate(p, params, chat=False).token_ids for p in prompts]
    together = [c.token_ids for c in engine.generate(prompts, params, chat=False)]
    assert alone == together


def test_new_requests_join_the_running_batch(smollm_engine):
    """A prompt that arrives while another request decodes enters in chunks, one chunk per step beside the
    decode row, so the running request gains a token every step. This plan is not calibrated: with no
    `prefill_chunk` set, its chunks are DEFAULT_PREFILL_CHUNK rows."""
    engine = smollm_engine
    assert engine.config.prefill_chunk is None and engine.plan.report.step_ms == {}
    chunk = DEFAULT_PREFILL_CHUNK
    a = engine.submit(engine.encode_prompt("Hello"), SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()  # nobody decodes: a's whole prompt runs in one step and samples its first token
    assert len(a.output_ids) == 1
    b_prompt = engine.encode_prompt("Say goodbye to everyone in the room, politely and at length. " * 6)
    assert len(b_prompt) > 2 * chunk
    b = engine.submit(b_prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    start = engine.prefix_cache.peek(b_prompt) if engine.prefix_cache is not None else 0  # the chat template's
    steps = -(-(len(b_prompt) - start) // chunk)  # system prompt, cached by earlier tests (prefix_cache.py)
    for i in range(steps):
        engine.step()
        assert len(a.output_ids) == 2 + i  # a's stream never stalls for b's prompt
        assert b.prefilled == min(len(b_prompt), start + (i + 1) * chunk) and b.cached_tokens == start
        assert len(b.output_ids) == (1 if i == steps - 1 else 0)
    assert (a.slot, b.slot) == (0, 1)
    while not engine.scheduler.idle:
        engine.step()
    assert a.finish_reason == b.finish_reason == "length"
    alone = engine.generate(b_prompt, SamplingParams(max_tokens=6, ignore_eos=True), chat=False)
    assert b.output_ids == list(alone.token_ids)  # chunked beside a decode row: the same tokens as alone


def test_a_calibrated_plan_chooses_the_chunk_its_stall_bound_allows(smollm):
    """With no `prefill_chunk` set, each step beside decode rows runs the prompt rows the plan's price
    allows (PlanReport.take_step_prompts): here a price of about 1 ms a prompt row, 4 ms a one-row step and
    20 ms an all-slots one gives about 2.5 x 20 - 4 = 46 rows at a prompt's start, fewer further in. A
    slower all-slots step allows more rows: the engine follows the price it is given, not a fixed chunk."""
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=512, prefix_cache_tokens=0), loaded=smollm)
    firsts = []
    for full in (20.0, 40.0):
        engine.plan.report = dataclasses.replace(
            engine.plan.report,
            step_ms={1: 4.0, 2: 4.0, 3: 4.0, 4: full},
            step_ms_far={1: 4.5, 2: 4.5, 3: 4.5, 4: full + 0.5},
            far_position=256,
            prompt_row_ms=1.0,
            prompt_row_position=64.0,
            prompt_row_ms_far=1.2,
            prompt_row_far_position=264.0,
        )
        a = engine.submit([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
        engine.step()
        b = engine.submit(list(range(5, 405)), SamplingParams(max_tokens=1))
        taken = []
        while b.prefilled < 400:
            before, tokens = b.prefilled, len(a.output_ids)
            (expected,) = engine.plan.report.take_step_prompts(
                [(before, 400 - before)], 1, None, PREFILL_CHUNK, a.position
            )
            engine.step()
            assert b.prefilled - before == expected and len(a.output_ids) == tokens + 1
            taken.append(expected)
        assert taken[-2] < taken[0]  # late rows cost more (the last chunk is what was left)
        firsts.append(taken[0])
        engine.cancel(a)
        while not engine.scheduler.idle:
            engine.step()
    assert 40 <= firsts[0] <= 50 and firsts[1] > 1.8 * firsts[0]


def test_cancel_frees_the_slot_at_the_next_step(smollm_engine):
    engine = smollm_engine
    reqs = [engine.submit([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True)) for _ in range(9)]
    engine.step()
    assert reqs[8].slot is None and len(engine.scheduler.waiting) == 1  # 8 slots, one waits
    engine.cancel(reqs[3])
    engine.step()
    assert reqs[3].finish_reason == "cancelled" and reqs[8].slot == 3
    for r in reqs:
        engine.cancel(r)
    engine.step()
    assert engine.scheduler.idle


def test_requests_that_cannot_fit_are_refused_up_front(smollm_engine):
    engine = smollm_engine
    with pytest.raises(RequestError, match="exceeds the context of 512") as err:
        engine.submit([1] * 500, SamplingParams(max_tokens=20))
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestError, match="exceeds the context of 512") as err:  # no room for the prompt itself
        engine.submit([1] * 513, SamplingParams(max_tokens=0))
    assert err.value.param == "prompt"
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ParamError, match="temperature"):  # out-of-range sampling: refused when built
        SamplingParams(temperature=3.0)
    assert engine.scheduler.idle


def test_bad_input_is_refused_when_given_and_a_failed_step_frees_its_slots(tiny_hf):
    """The Python API checks what the server checks: a token id outside the vocabulary and a mistyped
    sampling field are refused when given, naming it. Before, they failed inside a step and stayed in
    their slots, so every later call failed too. A step that fails anyway ends its requests and the next
    call works; generate([]) returns [] (it waited forever); an empty message list is refused (the chat
    template alone made a prompt of it)."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=128), loaded=load(tiny_hf("llama")))
    vocab = engine.plan.cfg.vocab_size
    with pytest.raises(RequestError, match="not a token id") as err:
        engine.generate([5, vocab], SamplingParams(max_tokens=2))
    assert err.value.param == "prompt"
    for bad in (dict(top_k=2.5), dict(seed=2**64), dict(stop=("",)), dict(max_tokens=True), dict(top_p="0.5")):
        with pytest.raises(ParamError) as err:
            SamplingParams(**bad)
        assert err.value.param == next(iter(bad))
    assert SamplingParams(stop="the end").stop == ("the end",)  # one stop string, not its letters
    good = engine.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    real = engine.plan.decode
    engine.plan.decode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated kernel failure"))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.plan.decode = real
    assert engine.scheduler.idle  # the failed step's requests left their slots
    again = engine.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    assert again.token_ids == good.token_ids and again.finish_reason == "length"
    assert engine.generate([]) == []
    for empty in (lambda: engine.generate([[]]), lambda: next(engine.stream([]))):
        with pytest.raises(RequestError, match="the prompt is empty") as err:
            empty()
        assert err.value.param == "prompt"
    with pytest.raises(ValueError, match="one prompt"):
        next(engine.stream(["a", "b"]))


def test_max_tokens_stop_strings_and_stop_ids(smollm_engine):
    engine = smollm_engine
    base = engine.generate("Count from 1 to 20, separated by commas.", SamplingParams(max_tokens=40))
    assert "5" in base.text
    cut = engine.generate("Count from 1 to 20, separated by commas.", SamplingParams(max_tokens=40, stop=("5",)))
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index("5")]
    first = base.token_ids[3]
    by_id = engine.generate(
        "Count from 1 to 20, separated by commas.", SamplingParams(max_tokens=40, stop_token_ids=(first,))
    )
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(first) + 1] and by_id.finish_reason == "stop"
    short = engine.generate("Count from 1 to 20.", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


def test_eos_ends_a_chat_reply(smollm_engine):
    done = smollm_engine.generate("What is 2+2?", SamplingParams(max_tokens=60))
    assert done.finish_reason == "stop" and done.token_ids[-1] in smollm_engine.tokenizer.eos_ids
    assert "<|im_end|>" not in done.text


def test_streamed_text_is_the_decoded_text(smollm_engine):
    engine = smollm_engine
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3)
    prompt = "Write one sentence with an emoji, an accented word like café, and some numbers."
    pieces, ids = [], []
    for d in engine.stream(prompt, params):
        pieces.append(d.text)
        ids += [c.token for c in d.choices]
    full = engine.generate(prompt, params)
    text = engine.tokenizer.decode([t for t in ids if t not in engine.tokenizer.eos_ids])
    assert "".join(pieces) == full.text == text
    assert "\ufffd" not in "".join(pieces)


def test_logprobs_are_the_model_distribution(smollm_engine):
    engine = smollm_engine
    ids = engine.encode_prompt("The capital of France is")
    c = engine.generate(ids, SamplingParams(max_tokens=1, logprobs=True, top_logprobs=5))
    choice = c.choices[0]
    expected = torch.log_softmax(engine.plan.prefill(ids, 0), -1)
    assert choice.logprob == pytest.approx(expected[choice.token].item(), abs=1e-5)
    assert [t for t, _ in choice.top] == torch.topk(expected, 5).indices.tolist()
    assert choice.top[0][0] == choice.token  # greedy takes the best


def test_prompt_logprobs_are_the_models_on_every_path_and_beside_other_rows(engine, monkeypatch):
    """Each prompt token after the first, scored under the logits of the row before it: the same numbers as
    the plan's own whole-prompt logits, whether the prompt runs alone or in chunks beside another request's
    decode rows (the torch paths run it whole and score 40 rows at a time); the sampled tokens and their
    logprobs are those of a request that did not ask, to the bit."""
    monkeypatch.setattr("metronome.engine.engine.SCORE_ROWS", 40)
    capitals = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid. "
    ids = engine.encode_prompt(3 * capitals + "The capital of")  # 96 tokens: beside decode rows, several chunks
    expected = torch.log_softmax(engine.plan.prefill(ids, 0, all_logits=True)[:, : engine.plan.cfg.vocab_size], -1)
    params = SamplingParams(max_tokens=4, logprobs=True, top_logprobs=3, prompt_logprobs=True, ignore_eos=True)
    alone = engine.generate(ids, params)
    other = engine.submit([1, 2, 3, 4], SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    crowded = engine.submit(ids, params)
    while crowded.finish_reason is None:
        engine.step()
    while other.finish_reason is None:
        engine.step()
    for got in (alone.prompt_choices, tuple(crowded.prompt_choices)):
        assert [c.token for c in got] == ids[1:]
        assert [c.logprob for c in got] == pytest.approx(
            [expected[p, t].item() for p, t in enumerate(ids[1:])], abs=1e-5
        )
        assert [[t for t, _ in c.top] for c in got] == torch.topk(expected[:-1], 3).indices.tolist()
    plain = engine.generate(ids, SamplingParams(max_tokens=4, logprobs=True, top_logprobs=3, ignore_eos=True))
    assert alone.token_ids == plain.token_ids == tuple(crowded.output_ids)
    assert [c.logprob for c in alone.choices] == [c.logprob for c in plain.choices]
    assert plain.prompt_choices == ()


def test_max_tokens_zero_scores_the_prompt_and_samples_nothing(engine):
    """Scoring a text (the completions API's max_tokens 0 with echo): the prompt's logprobs as a request that
    goes on would get them, no token, finish "length", alone or beside another request's decode rows, and
    the slot is free again for the next request."""
    ids = engine.encode_prompt("The capital of France is Paris. The capital of Italy is Rome. " * 2)
    score = SamplingParams(max_tokens=0, logprobs=True, top_logprobs=2, prompt_logprobs=True)
    going_on = engine.generate(ids, dataclasses.replace(score, max_tokens=1))
    alone = engine.generate(ids, score)
    assert (alone.token_ids, alone.text, alone.finish_reason) == ((), "", "length")
    assert alone.prompt_choices == going_on.prompt_choices and len(alone.prompt_choices) == len(ids) - 1
    other = engine.submit([1, 2, 3, 4], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.step()
    crowded = [engine.submit(ids, score) for _ in range(engine.config.slots)]  # every free slot, and one waits
    for _ in range(200):
        if other.finish_reason is not None and all(r.finish_reason is not None for r in crowded):
            break
        engine.step()
    assert all((r.finish_reason, r.output_ids) == ("length", []) for r in crowded)
    assert all(tuple(r.prompt_choices) == going_on.prompt_choices for r in crowded)
    assert len(other.output_ids) == 12
    assert engine.generate([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True)).finish_reason == "length"


def test_sampling_filters(smollm_engine):
    engine = smollm_engine
    ids = engine.encode_prompt("Pick a random animal.")
    logits = engine.plan.prefill(ids, 0)
    top2 = set((logits >= torch.topk(logits, 2).values[-1]).nonzero().flatten().tolist())  # ties stay in
    for seed in range(6):  # top_k=2 never leaves the two best
        tok = engine.generate(ids, SamplingParams(max_tokens=1, temperature=2.0, top_k=2, seed=seed)).token_ids[0]
        assert tok in top2
    probs = torch.softmax(logits / 1.5, -1)  # min_p applies to the tempered distribution, as vLLM's and HF's
    keep = set((probs >= 0.5 * probs.max()).nonzero().flatten().tolist())
    for seed in range(6):  # min_p=0.5 keeps tokens with at least half the top probability
        tok = engine.generate(ids, SamplingParams(max_tokens=1, temperature=1.5, min_p=0.5, seed=seed)).token_ids[0]
        assert tok in keep
    best = int(logits.argmax())
    for seed in range(4):  # a tiny top_p keeps only the best token
        assert (
            engine.generate(ids, SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=seed)).token_ids[0]
            == best
        )
    seeds = {engine.generate(ids, SamplingParams(max_tokens=6, temperature=1.5, seed=s)).text for s in range(5)}
    assert len(seeds) > 1  # different seeds, different samples


def test_penalties_change_the_distribution(smollm_engine):
    engine = smollm_engine
    ids = engine.encode_prompt("Repeat the word 'apple' ten times.")
    plain = engine.generate(ids, SamplingParams(max_tokens=24, ignore_eos=True))
    penalized = engine.generate(ids, SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=2.0))
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))
    rep = engine.generate(ids, SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.8))
    assert rep.token_ids != plain.token_ids


def test_background_thread_serves_concurrent_streams(smollm):
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=256), loaded=smollm)
    engine.start()
    try:
        import threading

        results: dict[int, str] = {}

        def worker(i: int) -> None:
            results[i] = "".join(d.text for d in engine.stream("Say hello", SamplingParams(max_tokens=8)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(set(results.values())) == 1 and len(results) == 6
    finally:
        engine.stop()


def test_top_p_shortcut_equals_the_full_sort():
    """Only the tokens at or above a bound are sorted when they hold the mass: the nucleus (its ids, most
    likely first, and their probabilities) is the full stable sort's, on peaked to flat distributions (the
    bound taken at 2^-10, at 2^-20, and not at all), with ties at the cut kept in the order of their ids."""
    from metronome.engine.sampler import nucleus

    def full_sort(probs: torch.Tensor, top_p: float) -> tuple[list[int], torch.Tensor]:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, -1) - sorted_probs
        n = int((before < top_p * probs.sum()).sum())
        return order[:n].tolist(), sorted_probs[:n]

    def same(probs: torch.Tensor, top_p: float) -> bool:
        ids, kept = nucleus(probs, top_p)
        want_ids, want = full_sort(probs, top_p)
        return ids.tolist() == want_ids and torch.equal(kept, want)

    g = torch.Generator().manual_seed(0)
    for temperature in (0.3, 1.0, 5.0, 50.0):  # peaked to flat distributions
        probs = torch.softmax(torch.randn(49152, generator=g) * 4 / temperature, -1)
        for top_p in (0.1, 0.5, 0.9, 0.99):
            assert same(probs, top_p), (temperature, top_p)
    for top, rest in ((0.3, 1e-5), (0.999, 1e-9)):  # the mass below the bound of 2^-10 (then of 2^-20) counts
        probs = torch.full((49152,), rest)
        probs[17] = top
        for top_p in (0.5, 0.9, 0.99, 0.9999, 0.99999):
            assert same(probs, top_p), (top, top_p)
    tied = torch.tensor([0.125] * 6 + [0.25])  # the cut falls inside the tie: the lower ids stay
    assert same(tied, 0.5) and nucleus(tied, 0.5)[0].tolist() == [6, 0, 1]


def test_a_steps_events_go_out_together_before_the_next_plan_call(tiny_hf):
    """On the stepping thread, a step's events reach their callbacks after every row of the step was
    sampled and before the next plan call (a server's loop then works beside that call, not in the middle
    of the step's sampling, where it would take the GIL from it); the last step's events go out as the
    engine goes idle; nothing is lost or reordered per request."""
    import threading

    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=128), loaded=load(tiny_hf("llama")))
    log: list[tuple[str, object]] = []
    decode, sample = engine.plan.decode, engine._sample

    def logged_decode(*args, **kwargs):
        log.append(("plan", -1))
        return decode(*args, **kwargs)

    def logged_sample(r, *args, **kwargs):
        log.append(("sample", r.id))
        return sample(r, *args, **kwargs)

    engine.plan.decode, engine._sample = logged_decode, logged_sample
    finished = threading.Semaphore(0)
    tokens: dict[str, list[int]] = {}

    def on_event(delta) -> None:
        log.append(("event", delta.request_id))
        tokens.setdefault(delta.request_id, []).extend(c.token for c in delta.choices)
        if delta.finish_reason is not None:
            finished.release()

    engine.start()
    try:
        params = [SamplingParams(max_tokens=n, temperature=0.8, seed=n, ignore_eos=True) for n in (6, 9, 4)]
        reqs = [engine.submit([1, 2, 3, 4 + i], p, on_event) for i, p in enumerate(params)]
        for _ in reqs:
            assert finished.acquire(timeout=60), "a request's last event never came"
    finally:
        engine.stop()
    segments: list[list[tuple[str, object]]] = [[]]
    for entry in log:
        if entry[0] == "plan":
            segments.append([])
        else:
            segments[-1].append(entry)
    for seg in segments:
        kinds = [kind for kind, _ in seg]
        if "event" in kinds:
            assert "sample" not in kinds[kinds.index("event") :], f"events delivered amid a step's sampling: {seg}"
    assert sum(kind == "event" for kind, _ in log) >= max(p.max_tokens for p in params)
    for r in reqs:
        assert tokens[r.id] == r.output_ids


def test_prompt_lookup_pauses_where_its_rows_cost_more_than_they_bring(tiny_hf, monkeypatch):
    """An engine without --draft judges prompt lookup's guesses: checking one costs a row of the step (up to
    half a one-row step on an AVX2 CPU), so guesses that are always wrong must pause drafting. A plan whose
    step takes 4 ms a row and a lookup that always guesses a token the text never holds: unjudged (the bare
    NgramDrafter), every step drafts."""
    from metronome.engine.speculate import NgramDrafter

    engine = Engine.from_model(str(tiny_hf("llama")), EngineConfig(slots=1, ctx=256, spec_tokens=4))
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    prompt = [1, 5, 9, 12, 30, 31, 7]
    never = next(t for t in range(3, 500) if t not in engine.generate(prompt, params).token_ids)
    monkeypatch.setattr(NgramDrafter, "propose", lambda self, slot, ids, k: [never] * k)
    decode = engine.plan.decode

    def slow_rows(slots, *args, **kwargs):
        time.sleep(0.004 * len(slots))
        return decode(slots, *args, **kwargs)

    monkeypatch.setattr(engine.plan, "decode", slow_rows)
    engine.spec.__init__()
    engine.generate(prompt, params)
    assert engine.spec.drafted > 0 and engine.spec.accepted == 0
    assert engine.spec.steps < 0.4 * params.max_tokens, f"{engine.spec.steps} of {params.max_tokens} steps drafted"


def test_generate_from_several_threads_without_start_takes_turns(smollm_engine):
    """Without `start()`, each caller of generate/stream steps the engine itself: callers on several threads
    must take turns. Two plan calls at once ran the same slots' rows together: greedy outputs came back as
    token 0 repeated past max_tokens, sampled ones raised on NaN probabilities, once a heap corruption."""
    import threading

    engine = smollm_engine
    prompts = ["What is 2+2?", "Name a fruit.", "Say hello.", "Count to three."]
    params = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=0.9, seed=7)]
    alone = {(i, j): engine.generate(p, sp).token_ids for i, p in enumerate(prompts) for j, sp in enumerate(params)}
    for _round in range(3):
        results: dict[tuple[int, int], tuple[int, ...]] = {}
        errors: list[BaseException] = []

        def worker(i: int, j: int, results=results, errors=errors) -> None:
            try:
                results[i, j] = engine.generate(prompts[i], params[j]).token_ids
            except BaseException as exc:  # reported below, with the others' results
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=key) for key in alone]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in threads)
        assert results == alone


def test_a_prompt_and_max_tokens_filling_the_context_exactly_run_and_every_token_is_text(tiny_hf):
    """The context's last position is usable (prompt + max_tokens == ctx is accepted and runs to "length"),
    and the streamed text is the whole text: the request's final event carries its token's text too."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=128), loaded=load(tiny_hf("llama")))
    try:
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        done = engine.generate([5] * 120, params)
        assert done.finish_reason == "length" and len(done.token_ids) == 8
        with pytest.raises(RequestError, match="exceeds the context"):
            engine.submit([5] * 121, params)
        three = SamplingParams(max_tokens=3, ignore_eos=True)
        deltas = list(engine.stream("a dog", three, chat=False))
        whole = engine.generate("a dog", three, chat=False)
        assert [c.token for d in deltas for c in d.choices] == list(whole.token_ids)
        assert "".join(d.text for d in deltas) == whole.text and deltas[-1].text and whole.text.strip()
        assert deltas[-1].finish_reason == "length"
    finally:
        engine.stop()


def test_prompts_are_taken_oldest_first_beside_a_decoding_request(tiny_hf):
    """Chunked prefill beside decode rows: the step's prompt budget goes to the request admitted first, so
    a prompt that arrives later cannot overtake (and delay) one already part-way through."""
    from metronome.model.loader import load

    engine = Engine.from_model(
        config=EngineConfig(slots=3, ctx=256, prefill_chunk=16), loaded=load(tiny_hf("llama")), calibrate=True
    )
    try:
        params = SamplingParams(max_tokens=60, ignore_eos=True)
        a = engine.submit([5, 6, 7], params)
        while not a.output_ids:
            engine.step()
        b = engine.submit([1] + [9] * 120, SamplingParams(max_tokens=2, ignore_eos=True))
        engine.step()
        c = engine.submit([1] + [8] * 120, SamplingParams(max_tokens=2, ignore_eos=True))
        for _ in range(200):  # bounded
            if b.output_ids and c.output_ids:
                break
            engine.step()
            assert b.prefilled >= c.prefilled or b.prefilled == len(b.prompt_ids), (b.prefilled, c.prefilled)
        assert b.timings.first_token < c.timings.first_token
        engine.cancel(a)
        engine.step()
    finally:
        engine.stop()


def test_the_draft_length_grows_when_drafts_pay_and_halves_when_they_miss_and_drafting_is_for_a_lone_user(tiny_hf):
    """spec_tokens is the most drafted per step: all right, one more next step (up to it); none right,
    half (a wrong guess costs rows). Two users at once: no drafts at all (a full step is not memory-bound)."""
    path = str(tiny_hf("llama"))
    params = SamplingParams(max_tokens=40, ignore_eos=True)  # room for 4 steps of 4 drafts
    engine = Engine.from_model(path, EngineConfig(slots=2, ctx=128, spec_tokens=4))
    prompt = [1, 5, 9, 12, 30, 31, 7]
    out = Engine.from_model(path, EngineConfig(slots=1, ctx=128, spec_tokens=0)).generate(prompt, params).token_ids
    vocab = engine.plan.cfg.vocab_size

    class Recorder:  # wrong (every draft) for its first `wrong` proposals, then the plain text itself
        def __init__(self, wrong: int) -> None:
            self.wrong, self.ks = wrong, []

        def reset(self, slot: int) -> None:
            pass

        def propose(self, slot: int, ids, k: int) -> list[int]:
            self.ks.append(k)
            done = len(ids) - len(prompt)
            guess = list(out[done : done + k])
            return guess if len(self.ks) > self.wrong else [(t + 1) % vocab for t in guess]

    for wrong, expected in ((99, [4, 2, 1, 1]), (0, [4, 4, 4, 4]), (2, [4, 2, 1, 2, 3, 4])):
        engine.drafter = Recorder(wrong)
        assert engine.generate(prompt, params).token_ids == out  # drafts never change the output
        assert engine.drafter.ks[: len(expected)] == expected, (wrong, engine.drafter.ks)
    engine.drafter = Recorder(0)
    both = engine.generate([prompt, [1, 6, 6, 6]], params)
    assert both[0].token_ids == out and engine.drafter.ks == []
    engine.drafter = Recorder(0)  # every draft right: 5 tokens a step, and the last step may use 1 draft
    short = SamplingParams(max_tokens=8, ignore_eos=True)
    assert engine.generate(prompt, short).token_ids == out[:8]
    assert engine.drafter.ks == [4, 1]  # never more drafts than max_tokens leaves room for


def test_a_torch_plans_weight_bytes_are_every_matrix_and_bias_once_and_one_embedding_row(tiny_hf):
    """What one decode step reads (PlanReport.weight_bytes): the tiny qwen2 in float32 has per layer its q/k/v
    rows with their biases, the output, gate, up and down matrices; the head (tied: the embedding table, read
    once as the head) and one embedding row."""
    engine = Engine.from_model(tiny_hf("qwen2"), EngineConfig(slots=1, ctx=32, weights="f32", kernels="torch"))
    c = engine.plan.cfg
    assert c.tie_embeddings and c.qkv_bias
    d, f, qkv = c.hidden_size, c.intermediate_size, c.q_size + 2 * c.kv_size
    layer = d * qkv + qkv + c.q_size * d + d * 2 * f + f * d
    assert engine.plan.report.weight_bytes == 4 * (c.num_layers * layer + c.vocab_size * d + d)


def test_no_drafts_are_made_while_a_prompt_runs_beside_the_decoding_request(tiny_hf):
    """Drafts are for a request that runs alone (its step memory-bound, extra rows nearly free): a step
    that carries a prompt's chunk beside it is not that, so the drafter is not even asked; once the prompt
    is in and only one request decodes again, it is."""
    path = str(tiny_hf("llama"))
    engine = Engine.from_model(path, EngineConfig(slots=2, ctx=256, spec_tokens=4, prefill_chunk=16))
    asked: list[int] = []

    class Recorder:
        def reset(self, slot: int) -> None:
            pass

        def propose(self, slot: int, ids, k: int) -> list[int]:
            asked.append(len(ids))
            return []

    engine.drafter = Recorder()
    a = engine.submit([1, 5, 9, 12], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()  # a's prompt, alone: its first token
    b = engine.submit([1] + [9] * 60, SamplingParams(max_tokens=1, ignore_eos=True))
    asked.clear()
    for _ in range(20):  # bounded: 61 rows in chunks of 16
        before = len(a.output_ids)
        engine.step()
        assert len(a.output_ids) == before + 1  # a decodes in every step beside b's chunks
        if b.prefilled == len(b.prompt_ids):
            break
    assert b.prefilled == len(b.prompt_ids) and asked == []
    engine.step()  # b ended with its one token: a runs alone again and drafts
    assert asked


def test_a_right_draft_that_ends_the_request_is_its_last_token(tiny_hf):
    """Drafts are checked row by row: a draft that is right but ends the request (a stop token) is the last
    token; the rows after it (also right) are not taken, so the answer stops where it stops without drafts."""
    path = str(tiny_hf("llama"))
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompt = [1, 5, 9, 12, 30, 31, 7]
    out = Engine.from_model(path, EngineConfig(slots=1, ctx=128, spec_tokens=0)).generate(prompt, params).token_ids
    # a token first seen at 2 or 3: the first decode step drafts out[1..4], so right rows follow it there
    stop = next(t for i, t in enumerate(out) if i in (2, 3) and t not in out[:i])
    end = out.index(stop)
    engine = Engine.from_model(path, EngineConfig(slots=1, ctx=128, spec_tokens=4))

    class Oracle:  # always the plain text's next tokens: every draft right
        def reset(self, slot: int) -> None:
            pass

        def propose(self, slot: int, ids, k: int) -> list[int]:
            done = len(ids) - len(prompt)
            return list(out[done : done + k])

    engine.drafter = Oracle()
    got = engine.generate(prompt, dataclasses.replace(params, stop_token_ids=(stop,)))
    assert got.finish_reason == "stop" and got.token_ids == out[: end + 1]


def test_each_request_admitted_to_a_slot_starts_the_drafter_afresh_there(tiny_hf):
    """A drafter keeps state per slot (a draft model's KV, a lookup's index): a new request in a slot resets
    it, so nothing of the slot's last request is drafted from."""
    engine = Engine.from_model(str(tiny_hf("llama")), EngineConfig(slots=2, ctx=128, spec_tokens=4))
    resets: list[int] = []

    class Recorder:
        def reset(self, slot: int) -> None:
            resets.append(slot)

        def propose(self, slot: int, ids, k: int) -> list[int]:
            return []

    engine.drafter = Recorder()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.generate([1, 5, 9], params)
    engine.generate([[1, 6, 6], [1, 7, 7]], params)
    assert resets == [0, 0, 1]


def test_a_sampled_request_beside_a_plain_greedy_one_samples_its_own_tokens(tiny_hf):
    """A plain greedy request makes the step take every row's argmax at once; a request beside it that
    samples (temperature, a seed) still draws from its own distribution: the tokens and logprobs it gets
    alone, not the argmax of its rows."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=128), loaded=load(tiny_hf("llama")))
    sampled = SamplingParams(max_tokens=12, temperature=1.5, seed=3, logprobs=True, ignore_eos=True)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = [1, 5, 9, 12]
    alone = engine.generate(prompt, sampled)
    argmax = engine.generate(prompt, greedy)
    assert alone.token_ids != argmax.token_ids  # the sampled text is not the greedy one
    together = [engine.submit(prompt, sampled), engine.submit([1, 7, 7, 30], greedy)]
    while not engine.scheduler.idle:
        engine.step()
    assert _trace(engine, together[0]) == tuple((c.token, c.logprob, c.top) for c in alone.choices)


def test_plainly_sampled_rows_drawn_together_are_what_each_request_draws_alone(smollm_engine, monkeypatch):
    """Requests that sample with nothing but temperature, top-k, top-p and min-p (no logprobs, penalties or
    bias) have their rows drawn in one kernel call a step (Engine._picks): each gets the tokens it gets
    alone (where its rows, drafted or not, go through its sampler's own call), and those its twin gets with
    logprobs asked (every row through its sampler, one at a time); each draws its own, not its neighbour's."""
    engine = smollm_engine
    assert engine.plan.draw_rows is not None  # the default CPU plan draws with the C++ kernel
    kernel, rows_a_call = engine.plan.draw_rows, []

    def counted(logits, rows, *args):
        rows_a_call.append(len(rows))
        return kernel(logits, rows, *args)

    monkeypatch.setattr(engine.plan, "draw_rows", counted)  # the samplers submitted from here on take it too
    settings = [(1.0, 1.0, 0.0, 0, 5), (0.7, 0.9, 0.0, 0, 6), (1.3, 1.0, 0.05, 0, 7), (0.9, 0.8, 0.1, 0, 5)]
    settings.append((1.2, 0.95, 0.0, 40, 8))
    params = [
        SamplingParams(max_tokens=24, temperature=t, top_p=p, min_p=m, top_k=k, seed=s, ignore_eos=True)
        for t, p, m, k, s in settings
    ]
    # scored prompt rows ahead of a prompt's last row in the step: the batched draw must skip them
    params[1] = dataclasses.replace(params[1], prompt_logprobs=True)
    prompts = [engine.encode_prompt(q) for q in ("Name a river.", "Why is the sky blue?", "Hi", "Count.", "Go!")]
    together = [engine.submit(pr, pa) for pr, pa in zip(prompts, params)]
    while not engine.scheduler.idle:
        engine.step()
    assert max(rows_a_call) == len(params)  # drawn together
    texts = set()
    for pr, pa, req in zip(prompts, params, together):
        alone = engine.generate(pr, pa).token_ids
        per_row = engine.generate(pr, dataclasses.replace(pa, logprobs=True)).token_ids
        assert tuple(req.output_ids) == tuple(alone) == tuple(per_row), pa
        texts.add(tuple(alone))
    assert len(texts) == len(params)  # five different answers (two of the same seed among them)


def test_a_torch_runner_returns_the_logits_of_the_rows_asked_for_in_their_order(tiny_hf):
    """Runner.decode with `logit_rows`: only those rows' logits, in the order given; each the row the whole
    step gives it. The rows run in the slots they name, whatever the runner's decode shape."""
    engine = Engine.from_model(tiny_hf("llama"), EngineConfig(slots=3, ctx=32, weights="f32", kernels="torch"))
    runner = engine.plan.runner
    for slot, prompt in ((0, [1, 5, 9]), (2, [1, 7, 7, 30])):
        runner.prefill(prompt, slot)
    slots, tokens, positions = [2, 0], [11, 12], [4, 3]
    every = runner.decode(slots, tokens, positions)
    for slot, prompt in ((0, [1, 5, 9]), (2, [1, 7, 7, 30])):
        runner.prefill(prompt, slot)  # the same KV again (the step above wrote one position more)
    picked = runner.decode(slots, tokens, positions, logit_rows=[1])
    assert every.shape[0] == 2 and picked.shape[0] == 1 and torch.equal(picked[0], every[1])
    alone = runner.prefill([1, 7, 7, 30, 11], 1)  # slot 2's row, run as a prompt in another slot
    torch.testing.assert_close(every[0], alone, rtol=1e-4, atol=1e-4)

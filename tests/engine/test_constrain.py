"""JSON-constrained decoding: the prefix automaton, the budget guarantee, and the engine path."""

from __future__ import annotations

import json

import pytest
import torch

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.engine.constrain import JsonConstraint, JsonVocabulary, Mode, State, completion, feed
from metronome.model.tokenizer import Tokenizer

DOCUMENTS = [
    {},
    {"a": 1},
    {"name": 'Ada "Lovelace"', "born": 1815, "tags": ["math", "poet\\ry"], "alive": False, "spouse": None},
    {"x": -0.5e-3, "y": [[], {}, [1, [2, {"z": True}]]], "s": "caf\u00e9 \u2603 \n\t"},
    {"deep": {"deeper": {"deepest": [0, 10, -7, 3.25, 1e9]}}},
]


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm) -> Tokenizer:
    return Tokenizer(smollm.tokenizer)


@pytest.fixture(scope="module")
def vocab(smollm_tokenizer) -> JsonVocabulary:
    return JsonVocabulary.of(smollm_tokenizer)


def _texts(doc: object) -> list[str]:
    return [json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, ensure_ascii=False, separators=(",", ":"))]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_prefix_of_a_json_object_is_accepted_and_completes(doc):
    for text in _texts(doc):
        for cut in range(len(text) + 1):
            state = feed(State(), text[:cut])
            assert state is not None, f"valid prefix refused: {text[:cut]!r}"
            json.loads(text[:cut] + completion(state))  # raises unless the completion closes it
        assert feed(State(), text).mode == Mode.DONE


@pytest.mark.parametrize(
    "bad",
    [
        "[1]",
        "1",
        '"s"',
        "{1:2}",
        '{"a" 1}',
        '{"a":01}',
        '{"a":1,}',
        '{"a":.5}',
        '{"a":1.}',
        '{"a":-}',
        '{"a":tru}',
        '{"a":truth}',
        '{"a":nul1}',
        '{"a":"\x01"}',
        '{"a":"\\x"}',
        '{"a":"\\u12g4"}',
        '{"a":[1 2]}',
        '{"a":[1,]}',
        '{"a":1]',
        '{"a":[1}',
        "{}}",
        "{} x",
        '{"a":1e}',
        '{"a":+1}',
        "{'a':1}",
    ],
)
def test_invalid_json_is_refused_at_the_first_bad_character(bad):
    assert feed(State(), bad) is None


def test_completions_are_shortest_and_each_step_brings_closing_one_character_nearer():
    """Following the completion character by character reaches DONE, one character of cost per step."""
    text = json.dumps(DOCUMENTS[3])
    for cut in range(len(text)):
        state = feed(State(), text[:cut])
        rest = completion(state)
        for i, c in enumerate(rest):
            state = feed(state, c)
            assert len(completion(state)) == len(rest) - i - 1
        assert state.mode == Mode.DONE


def test_whitespace_runs_outside_strings_are_capped_inside_strings_free():
    assert feed(State(), "{" + " " * 200) is None
    assert feed(State(), '{"a": "' + " " * 200 + '"}').mode == Mode.DONE


def _run(
    constraint: JsonConstraint, tokenizer: Tokenizer, logits_for, budget: int, sample: bool, g: torch.Generator
) -> list[int]:
    out: list[int] = []
    for _ in range(budget):
        logits = logits_for(len(out))
        allowed = torch.nonzero(constraint.allowed(logits)).flatten()  # choose among the allowed only
        scores = logits[allowed]
        if sample:
            token = int(allowed[torch.multinomial(torch.softmax(scores, 0), 1, generator=g)])
        else:
            token = int(allowed[torch.argmax(scores)])
        constraint.accept(token)
        out.append(token)
        if token in tokenizer.eos_ids or constraint.finished():
            break
    return out


@pytest.mark.parametrize("sample", [False, True])
def test_random_logits_always_give_parseable_json_within_the_budget(vocab, smollm_tokenizer, sample):
    g = torch.Generator().manual_seed(11 + sample)
    V = smollm_tokenizer.vocab_size
    for trial in range(12):
        budget = 2 + trial * 4
        c = JsonConstraint(vocab, budget, width=64 if sample else 1)
        out = _run(c, smollm_tokenizer, lambda _i: torch.randn(V, generator=g) * 4, budget, sample, g)
        assert len(out) <= budget
        assert c.closed, f"budget {budget}: not closed: {c.text!r}"
        assert isinstance(json.loads(smollm_tokenizer.decode(out)), dict)


def test_logits_that_want_to_nest_forever_are_closed_by_the_budget(vocab, smollm_tokenizer):
    """An adversary that always prefers opening a new container still ends with a complete object."""
    V = smollm_tokenizer.vocab_size
    openers = [i for i, t in enumerate(vocab.texts) if t.strip() in ('{"', "[", '{"a":[', "[[", "{", '":[')]
    g = torch.Generator().manual_seed(3)
    for budget in (2, 3, 7, 20, 41):

        def logits_for(_i: int) -> torch.Tensor:
            logits = torch.randn(V, generator=g)
            logits[openers] += 50.0
            return logits

        c = JsonConstraint(vocab, budget, width=1)
        out = _run(c, smollm_tokenizer, logits_for, budget, False, g)
        assert len(out) <= budget and c.closed
        json.loads(smollm_tokenizer.decode(out))


def test_after_the_object_closes_only_an_end_token_is_allowed(vocab, smollm_tokenizer):
    c = JsonConstraint(vocab, 10)
    for t in smollm_tokenizer.encode("{}"):
        c.accept(t)
    assert c.closed and not c.finished()
    mask = c.allowed(torch.randn(smollm_tokenizer.vocab_size))
    assert set(torch.nonzero(mask).flatten().tolist()) == set(smollm_tokenizer.eos_ids)
    c.accept(smollm_tokenizer.eos_ids[0])
    assert c.finished()


def test_greedy_masks_stay_small_and_never_empty(vocab, smollm_tokenizer):
    """The constraint checks candidates in logit order instead of masking the whole vocabulary."""
    g = torch.Generator().manual_seed(5)
    c = JsonConstraint(vocab, 64, width=1)
    for _ in range(30):
        mask = c.allowed(torch.randn(smollm_tokenizer.vocab_size, generator=g))
        assert 1 <= int(mask.sum()) <= 2  # the best valid token, plus the next closing character
        c.accept(int(torch.nonzero(mask)[0]))
        if c.closed:
            break


def test_refuses_impossible_budgets_and_foreign_tokens(vocab, smollm_tokenizer):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        JsonConstraint(vocab, 1)
    c = JsonConstraint(vocab, 8)
    with pytest.raises(ValueError, match="does not continue the JSON"):
        c.accept(smollm_tokenizer.encode("hello")[0])


def test_a_vocabulary_without_json_characters_is_refused_with_the_missing_ones(tiny_hf):
    from metronome.model.loader import load

    words = Tokenizer(load(tiny_hf("llama")).tokenizer)  # a word-level vocabulary: no "{" token
    with pytest.raises(ValueError, match="no single-character token"):
        JsonVocabulary.of(words)


def test_the_engine_returns_parseable_json_with_its_closing_brace(smollm, vocab):
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=256), loaded=smollm)
    prompt = engine.encode_prompt("Describe a cat as a JSON object with name and age.")
    for budget, temperature in ((6, 0.0), (20, 0.0), (12, 0.8)):
        params = SamplingParams(max_tokens=budget, temperature=temperature, seed=1, json_mode=True)
        req = engine.submit(
            prompt, params, constraint=JsonConstraint(vocab, budget, width=1 if not temperature else 64)
        )
        while req.finish_reason is None:
            engine.step()
        assert isinstance(json.loads(req.text.text), dict), req.text.text
        assert req.finish_reason in ("stop", "length") and len(req.output_ids) <= budget


def test_sampling_in_json_mode_keeps_only_the_best_64_valid_tokens(vocab, smollm_tokenizer):
    """The documented truncation (metronome/serve/jobs.py, _JSON_SAMPLING_WIDTH): the server's constraint
    for a sampled request allows exactly the 64 highest-scoring valid tokens plus the next closing
    character, and a greedy request only the best valid one."""
    from types import SimpleNamespace

    from metronome.serve.jobs import _JSON_SAMPLING_WIDTH, Job

    assert _JSON_SAMPLING_WIDTH == 64
    server = SimpleNamespace(json_vocab=vocab)
    sampled = Job._constraint(server, SamplingParams(max_tokens=50, temperature=0.8, json_mode=True))
    penalized = Job._constraint(server, SamplingParams(max_tokens=50, frequency_penalty=0.5, json_mode=True))
    greedy = Job._constraint(server, SamplingParams(max_tokens=50, json_mode=True))
    assert (sampled.width, penalized.width, greedy.width) == (64, 64, 1)
    assert Job._constraint(server, SamplingParams(max_tokens=50, temperature=0.8)) is None

    for t in smollm_tokenizer.encode('{"name": "Ada'):  # inside a string: almost every token is valid
        sampled.accept(t)
    V = smollm_tokenizer.vocab_size
    logits = torch.randn(V, generator=torch.Generator().manual_seed(8))
    valid = [
        t
        for t in range(V)
        if vocab.texts[t]
        and feed(sampled.state, vocab.texts[t]) is not None
        and len(completion(feed(sampled.state, vocab.texts[t])))
        <= 50 - len(smollm_tokenizer.encode('{"name": "Ada')) - 1
    ]
    assert len(valid) > 10_000
    best = set(sorted(valid, key=lambda t: -logits[t].item())[:64])
    closing = vocab.char_tokens[completion(sampled.state)[0]]
    allowed = set(torch.nonzero(sampled.allowed(logits)).flatten().tolist())
    assert allowed == best | {closing}

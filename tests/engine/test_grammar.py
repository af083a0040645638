"""Grammar-constrained decoding through llguidance (engine/grammar.py) on SmolLM2's tokenizer: the masks,
the mask thread (the same masks and tokens as computing them inline), the engine path (outputs that
validate against their schema, finish reasons), the masked greedy shortcut, and schemas refused with the
parameter named."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import numpy as np
import pytest
import torch

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.engine.grammar import Grammar, GrammarConstraint, GrammarError, Grammars
from metronome.engine.request import ConstraintError
from metronome.engine.sampler import RequestSampler
from metronome.model.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "pets": ["cat", "dog"], "email": "ada@math.com"}


@pytest.fixture(scope="module")
def tokenizer(smollm) -> Tokenizer:
    return Tokenizer(smollm.tokenizer)


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    g = Grammars(tokenizer)
    yield g
    g.close()


@pytest.fixture(scope="module")
def engine(smollm):
    engine = Engine.from_model(config=EngineConfig(slots=3, ctx=512, spec_tokens=0), loaded=smollm)
    yield engine
    engine.stop()


def written(doc) -> str:
    """A document as the grammar's JSON options write it (", " and ": " separators)."""
    return json.dumps(doc, separators=(", ", ": "))


def inline(grammars: Grammars, grammar: Grammar) -> GrammarConstraint:
    """A constraint that computes each mask on the caller's thread (no mask thread)."""
    return GrammarConstraint(llguidance.LLMatcher(grammars.ll, grammar.text), grammars.vocab_size, grammar, None)


def test_a_valid_document_passes_token_by_token_and_ends_the_grammar(grammars, tokenizer):
    grammar = grammars.json_schema(PERSON, "schema", "person")
    c = grammars.constraint(grammar)
    ids = tokenizer.encode(written(DOC), add_bos=False)
    for t in ids:
        assert not c.finished()
        mask = c.next_mask()
        assert mask.dtype == torch.bool and mask.shape == (tokenizer.vocab_size,)
        assert mask[t], f"token {t} ({tokenizer.decode([t])!r}) of a valid document was masked"
        c.accept(t)
    assert c.finished()  # the object is closed: nothing may follow but the end
    assert set(torch.nonzero(c.next_mask()).flatten().tolist()) <= set(tokenizer.eos_ids)


def test_tokens_outside_the_schema_are_masked_and_refused(grammars, tokenizer):
    c = grammars.constraint(grammars.json_schema(PERSON, "schema"))
    for t in tokenizer.encode('{"name": "Bo", "age": ', add_bos=False):
        c.accept(t)
    mask = c.next_mask()
    for text in ("-", '"', "true", "}"):  # age is an integer >= 0, and it is required
        (t,) = tokenizer.encode(text, add_bos=False)
        assert not mask[t], text
    (bad,) = tokenizer.encode('"', add_bos=False)
    with pytest.raises(ConstraintError, match="not allowed"):
        c.accept(bad)


def test_the_mask_thread_gives_the_masks_computed_inline(grammars, tokenizer):
    grammar = grammars.json_schema(PERSON, "schema")
    threaded, here = grammars.constraint(grammar), inline(grammars, grammar)
    for t in tokenizer.encode(written(DOC), add_bos=False):
        assert torch.equal(threaded.next_mask(), here.next_mask())
        threaded.accept(t)
        here.accept(t)
    assert threaded.finished() and here.finished()


def test_a_padded_logits_row_never_allows_the_padding(grammars, tokenizer):
    c = grammars.constraint(grammars.json_object())
    allowed = c.allowed(torch.zeros(tokenizer.vocab_size + 64))
    assert allowed.shape == (tokenizer.vocab_size + 64,) and not allowed[tokenizer.vocab_size :].any()
    assert allowed[: tokenizer.vocab_size].equal(c.next_mask())


def test_masked_greedy_is_the_argmax_over_the_allowed_tokens():
    """The sampler's shortcut (the row's argmax when allowed) picks what a full masked argmax picks, ties too."""
    g = torch.Generator().manual_seed(0)
    sampler = RequestSampler(SamplingParams(temperature=0.0), [1], 1000)
    for trial in range(200):
        logits = torch.randint(0, 8, (1000,), generator=g).float()  # many ties
        allowed = torch.rand(1000, generator=g) < (0.02 if trial % 2 else 0.9)
        allowed[int(torch.randint(0, 1000, (1,), generator=g))] = True
        want = int(torch.argmax(logits.masked_fill(~allowed, float("-inf"))))
        assert sampler.choose(logits, allowed).token == want


# -- the engine path -------------------------------------------------------------------------------


def _generate(engine: Engine, grammars: Grammars, grammar: Grammar, params: SamplingParams, prompt: str):
    req = engine.submit(engine.encode_prompt(prompt), params, None, grammars.constraint(grammar))
    while req.finish_reason is None:
        engine.step()
    return req


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_engine_outputs_validate_and_stop_at_the_closing_brace(engine, grammars, tokenizer, temperature):
    grammar = grammars.json_schema(PERSON, "schema", "person")
    for seed, subject in enumerate(("a teacher", "a sailor", "a child")):
        params = SamplingParams(max_tokens=120, temperature=temperature, seed=seed)
        req = _generate(engine, grammars, grammar, params, f"Describe {subject} as JSON.")
        text = tokenizer.decode([t for t in req.output_ids if t not in tokenizer.eos_ids])
        assert req.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_gives_an_object(engine, grammars, tokenizer):
    req = _generate(engine, grammars, grammars.json_object(), SamplingParams(max_tokens=80), "List three fruits.")
    text = tokenizer.decode([t for t in req.output_ids if t not in tokenizer.eos_ids])
    assert req.finish_reason == "stop" and isinstance(json.loads(text), dict)


def test_the_same_tokens_with_and_without_the_mask_thread(engine, smollm, tokenizer):
    """Determinism: the overlap changes when a mask is computed, never which; several requests share steps."""
    outputs = []
    for mask_thread in (True, False):
        g = Grammars(tokenizer, mask_thread=mask_thread)
        grammar = g.json_schema(PERSON, "schema")
        reqs = [
            engine.submit(
                engine.encode_prompt(f"Describe {who} as JSON."),
                SamplingParams(max_tokens=60, temperature=0.7, seed=3),
                None,
                g.constraint(grammar),
            )
            for who in ("a pilot", "a cook", "a poet")
        ]
        while any(r.finish_reason is None for r in reqs):
            engine.step()
        outputs.append([r.output_ids for r in reqs])
        g.close()
    assert outputs[0] == outputs[1]


def test_a_budget_too_small_ends_with_length_and_a_prefix(engine, grammars, tokenizer):
    """llguidance does not close a document within max_tokens: the reply is cut, as OpenAI's is."""
    grammar = grammars.json_schema(PERSON, "schema")
    req = _generate(engine, grammars, grammar, SamplingParams(max_tokens=4), "Describe a teacher as JSON.")
    assert req.finish_reason == "length" and len(req.output_ids) == 4
    c = inline(grammars, grammar)
    for t in req.output_ids:  # still a prefix the grammar accepts
        c.accept(t)
    assert not c.finished()


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, says",
    [
        ({"type": "frobnicate"}, "Invalid type"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "format": "credit-card"}, "format"),
        ({"type": "string", "pattern": "(unclosed"}, "regex"),
        ({"$ref": "#/$defs/Missing"}, "does not exist"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable"),
        ([1, 2], "must be an object"),
        ({"$ref": "#"}, "constraint failed"),  # passes validation, fails at its first mask: it was a 500
        # integers past 2**53 became their nearest double: a const of 2**53 + 1 was answered with 2**53
        ({"type": "object", "properties": {"v": {"const": 2**53 + 1}}}, "9007199254740993"),
        ({"enum": [1, {"deep": [-(2**60)]}]}, "cannot be enforced exactly"),
        ({"type": "integer", "minimum": 2**53 + 1, "maximum": 2**53 + 3}, "9007199254740993"),
    ],
)
def test_schemas_it_cannot_enforce_are_refused_naming_the_parameter(grammars, schema, says):
    with pytest.raises(GrammarError, match=says) as err:
        grammars.json_schema(schema, "response_format.json_schema.schema", "x")
    assert err.value.param == "response_format.json_schema.schema"
    assert str(err.value).startswith("response_format.json_schema.schema")


def test_the_mask_array_is_little_endian_bits(grammars, tokenizer):
    """The bool mask unpacks llguidance's words in token order (checked against its own byte mask)."""
    c = grammars.constraint(grammars.json_object())
    ref = inline(grammars, grammars.json_object())
    bias = np.frombuffer(ref.matcher.compute_logit_bias(), dtype=np.uint8)[: tokenizer.vocab_size] > 0
    assert np.array_equal(c.next_mask().numpy(), bias)


def _takes(grammars: Grammars, tokenizer: Tokenizer, schema: dict, doc) -> bool:
    """Whether the schema's grammar lets `doc` through token by token and ends there."""
    c = inline(grammars, grammars.json_schema(schema, "schema"))
    for t in tokenizer.encode(written(doc), add_bos=False):
        if not c.next_mask()[t]:
            return False
        c.accept(t)
    return c.finished()


INT_A = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
BOOL_B = {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}


@pytest.mark.parametrize(
    "fmt, good, bad",
    [
        (  # 2010 is no leap year though it ends in 0, 2400 is one (centuries: divisible by 400)
            "date",
            ["2024-02-29", "2000-02-29", "2400-02-29", "2021-02-28", "2021-12-31"],
            ["2021-02-29", "1900-02-29", "2010-02-29", "2021-04-31"],
        ),
        (
            "date-time",
            ["2024-02-29T10:00:00Z", "1996-12-19T16:39:57-08:00", "2021-01-01t23:59:60.5+01:00"],
            ["2021-02-29T10:00:00Z", "2021-01-01T24:00:00Z", "2021-01-01T10:00:00"],
        ),
    ],
)
def test_dates_keep_the_calendar(grammars, tokenizer, fmt, good, bad):
    """llguidance's date let 29 February through in any year; RFC 3339 (JSON Schema's format) does not.
    jsonschema's own format checker agrees with every case."""
    from metronome.serve.tools import closed

    schema = {"type": "object", "properties": {"d": {"type": "string", "format": fmt}}, "required": ["d"]}
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for text in good:
        assert _takes(grammars, tokenizer, closed(schema), {"d": text}), text
    for text in bad:
        assert not _takes(grammars, tokenizer, closed(schema), {"d": text}), text
    if fmt == "date":
        assert all(checker.is_valid({"d": t}) for t in good) and not any(checker.is_valid({"d": t}) for t in bad)


def test_integers_up_to_two_to_the_53_are_served(grammars, tokenizer):
    schema = {"type": "object", "properties": {"v": {"const": -(2**53)}, "w": {"maximum": 2**53}}, "required": ["v"]}
    assert _takes(grammars, tokenizer, schema, {"v": -(2**53)})


@pytest.mark.parametrize(
    "schema, good, bad",
    [
        (
            {"allOf": [INT_A, BOOL_B]},
            [{"a": 1, "b": True}],
            [{"a": 1}, {"a": 1, "b": True, "c": 1}, {"a": "x", "b": True}],
        ),
        (  # a base and a fragment: the object's own properties beside allOf
            {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}], **BOOL_B},
            [{"a": 1, "b": True}],
            [{"b": True}, {"b": True, "a": 1, "z": 0}],
        ),
        ({"$defs": {"Base": INT_A}, "allOf": [{"$ref": "#/$defs/Base"}, BOOL_B]}, [{"a": 1, "b": True}], [{"b": True}]),
        ({"allOf": [{"allOf": [INT_A]}, BOOL_B]}, [{"a": 1, "b": True}], [{"a": 1, "b": True, "c": 1}]),
        (  # a reference beside the object's own properties applies with them (2020-12): refused as
            # unsatisfiable, the definition closed to a and the object to b
            {"$defs": {"Base": INT_A}, "$ref": "#/$defs/Base", **BOOL_B},
            [{"a": 1, "b": True}],
            [{"b": True}, {"a": 1}, {"a": 1, "b": True, "c": 1}],
        ),
        (  # alternatives beside the object's own properties
            {
                **{"type": "object", "properties": {"kind": {"const": "k"}}, "required": ["kind"]},
                "anyOf": [INT_A, BOOL_B],
            },
            [{"kind": "k", "a": 1}, {"kind": "k", "b": False}],
            [{"kind": "k"}, {"kind": "k", "a": 1, "q": 1}],
        ),
        ({"anyOf": [INT_A, BOOL_B]}, [{"a": 1}, {"b": False}], [{"a": 1, "c": 1}]),  # whole alternatives: each closed
    ],
)
def test_an_object_described_in_parts_is_closed_where_they_meet(grammars, tokenizer, schema, good, bad):
    """`closed` (serve/tools.py) closes each object to the keys it lists; one described in parts (allOf, or
    anyOf beside properties of its own) is closed once, to the keys of all its parts. Closed part by part,
    each part forbade the others' keys and such schemas were refused as unsatisfiable."""
    from metronome.serve.tools import closed

    shaped = closed(schema)
    for doc in good:
        jsonschema.validate(doc, schema)
        assert _takes(grammars, tokenizer, shaped, doc), doc
    for doc in bad:
        assert not _takes(grammars, tokenizer, shaped, doc), doc


def test_a_grammar_failing_mid_answer_ends_its_request_alone(engine, grammars, tokenizer):
    """A constraint that fails after its start (llguidance's limits, met a few tokens in) raised out of the
    step, and the step failed every request in it: one client's schema ended the answers of all the others.
    Now that request ends with "error" naming its grammar, and the others run on, as they would alone."""
    from metronome.engine.request import Delta

    class FailsAtThird:
        """The real grammar's constraint, failing as llguidance does on its third mask."""

        def __init__(self, inner: GrammarConstraint) -> None:
            self.inner, self.masks = inner, 0

        def allowed(self, logits):
            self.masks += 1
            if self.masks == 3:
                raise ConstraintError("the json_schema constraint failed: Too many items (limit 50000)")
            return self.inner.allowed(logits)

        def accept(self, token):
            self.inner.accept(token)

        def finished(self):
            return self.inner.finished()

        def stops_apply(self):
            return False

    prompt = tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    plain = SamplingParams(max_tokens=16, ignore_eos=True)
    alone = engine.generate(tokenizer.encode_chat([{"role": "user", "content": "Say hello."}]), plain)
    ends: dict[str, Delta] = {}
    bad = engine.submit(
        prompt,
        SamplingParams(max_tokens=16),
        lambda d: ends.setdefault("bad", d) if d.finish_reason else None,
        FailsAtThird(grammars.constraint(grammars.json_schema(PERSON, "schema"))),
    )
    good = engine.submit(
        tokenizer.encode_chat([{"role": "user", "content": "Say hello."}]),
        plain,
        lambda d: ends.setdefault("good", d) if d.finish_reason else None,
    )
    for _ in range(200):
        if len(ends) == 2:
            break
        engine.step()
    assert ends["bad"].finish_reason == "error" and "Too many items" in ends["bad"].error
    assert len(bad.output_ids) == 2  # its first two tokens, then the failure
    assert ends["good"].finish_reason == "length" and good.output_ids == list(alone.token_ids)


def test_masks_are_computed_on_the_callers_thread_once_the_grammars_is_closed(tokenizer):
    """Closing the Grammars (the server stopping) cancels the masks queued on its thread and takes no more:
    a constraint then computes its masks where they are asked for, the same masks, instead of failing."""
    import threading

    g = Grammars(tokenizer)
    grammar = g.json_schema(PERSON, "schema")
    release = threading.Event()
    busy = g._worker.submit(release.wait, 10)  # the mask thread is busy: the next mask waits in its queue
    queued = g.constraint(grammar)
    g.close()  # cancels the queued mask
    release.set()
    busy.result(timeout=10)
    after = g.constraint(grammar)  # nothing takes masks now
    ids = tokenizer.encode(written(DOC), add_bos=False)
    for c in (queued, after):
        ref = inline(g, grammar)
        for t in ids:
            assert torch.equal(c.next_mask(), ref.next_mask())
            c.accept(t)
            ref.accept(t)
        assert c.finished()


def test_the_grammars_tried_once_are_remembered_up_to_a_bound(tokenizer, monkeypatch):
    """Each grammar's first matcher is tried once and remembered (an agent sends the same schema call after
    call), the latest STARTED_KEPT of them: a server fed distinct schemas for days must not grow for ever."""
    from metronome.engine import grammar as module

    monkeypatch.setattr(module, "STARTED_KEPT", 2)
    g = Grammars(tokenizer, mask_thread=False)
    made = [g.json_schema({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}, "schema") for i in range(3)]
    assert list(g._started) == [made[1].text, made[2].text]  # the oldest went first


def test_a_token_accepted_while_its_mask_is_computing_waits_for_the_mask(tokenizer):
    """The matcher is the mask thread's while it computes a mask (llguidance drops the GIL and writes through a
    raw pointer), so a token accepted before anyone asked for that mask (a forced or drafted token) waits
    for the computation to end before it changes the matcher. The matcher's calls are logged in order."""
    import threading

    log: list[str] = []

    class Logged:
        def __init__(self, inner: llguidance.LLMatcher) -> None:
            self.inner = inner

        def unsafe_compute_mask_ptr(self, ptr: int, size: int) -> None:
            log.append("compute")
            self.inner.unsafe_compute_mask_ptr(ptr, size)

        def consume_token(self, token: int) -> bool:
            log.append("consume")
            return self.inner.consume_token(token)

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    g = Grammars(tokenizer)
    try:
        grammar = g.json_schema(PERSON, "schema")
        release = threading.Event()
        busy = g._worker.submit(release.wait, 10)  # the mask thread is busy: the first mask waits in its queue
        c = GrammarConstraint(Logged(llguidance.LLMatcher(g.ll, grammar.text)), g.vocab_size, grammar, g._worker)
        first = tokenizer.encode(written(DOC), add_bos=False)[0]
        accepting = threading.Thread(target=c.accept, args=(first,), daemon=True)
        accepting.start()
        accepting.join(timeout=0.3)  # time for a wrong accept to reach the matcher
        assert log == [], "the token reached the matcher while its mask was still to be computed"
        release.set()
        busy.result(timeout=10)
        accepting.join(timeout=10)
        assert not accepting.is_alive()
        ref = inline(g, grammar)
        ref.accept(first)
        assert torch.equal(c.next_mask(), ref.next_mask())
        assert log == ["compute", "consume", "compute"]
    finally:
        g.close()


def test_what_llguidance_would_only_warn_about_is_refused(tokenizer, monkeypatch):
    """A grammar llguidance accepts with warnings (something it would ignore) is refused, naming the parameter
    and passing the warnings on, rather than enforced in part. No schema tried here reaches that branch with
    today's llguidance (unsupported keywords come back as errors), so its answer is stood in for."""
    g = Grammars(tokenizer, mask_thread=False)
    monkeypatch.setattr(
        llguidance.LLMatcher, "validate_grammar_with_warnings", staticmethod(lambda text, ll: (False, ["ignored x"]))
    )
    with pytest.raises(GrammarError, match="does not enforce: ignored x") as refused:
        g.json_schema({"type": "object"}, "response_format.json_schema.schema")
    assert refused.value.param == "response_format.json_schema.schema"


def test_a_grammar_whose_first_mask_allows_nothing_is_refused(tokenizer, monkeypatch):
    """A grammar that validates but whose first mask allows no token at all would leave its request nothing to
    sample: it is refused up front, naming the parameter (its first mask stood in for as all False)."""
    g = Grammars(tokenizer, mask_thread=False)
    monkeypatch.setattr(GrammarConstraint, "next_mask", lambda self: torch.zeros(g.vocab_size, dtype=torch.bool))
    with pytest.raises(GrammarError, match="allows no output at all") as refused:
        g.json_schema({"type": "object"}, "tools[0].function.parameters")
    assert refused.value.param == "tools[0].function.parameters"
    assert not g._started  # not remembered as started: the next request is checked again

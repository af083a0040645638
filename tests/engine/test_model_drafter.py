"""ModelDrafter with prompt lookup: the lookup's guesses are checked by the draft model in the call that
catches its cache up, so the drafts are exactly the draft model's sequential greedy drafts, in fewer calls
where the text repeats (one call for all k drafts where the whole guess is right)."""

from __future__ import annotations

import pytest

from metronome.compile import compile_plan
from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.engine.speculate import ModelDrafter, NgramDrafter
from metronome.model.loader import load


def test_lookup_checked_drafts_are_the_sequential_drafts(tiny_hf):
    path = str(tiny_hf("llama"))
    loaded = load(path)
    config = EngineConfig(slots=1, ctx=160, spec_tokens=0)
    prompt = [1, 5, 9, 12, 30, 31, 7, 5, 9, 12]
    text = Engine.from_model(config=config, loaded=loaded).generate(
        prompt, SamplingParams(max_tokens=60, ignore_eos=True)
    )
    seq = prompt + list(text.token_ids)  # the model's own greedy text: what its drafts should say
    vocab = loaded.config.vocab_size
    plain = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab)
    looked = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab, lookup=NgramDrafter())
    calls = []  # (rows run, rows given logits) of each of the looked drafter's calls
    decode = looked.plan.decode

    def counted(slots, tokens, positions, logit_rows=None):
        calls.append((len(tokens), len(tokens) if logit_rows is None else len(logit_rows)))
        return decode(slots, tokens, positions, logit_rows)

    looked.plan.decode = counted
    single = 0  # steps of k >= 4 drafts made in one draft-model call
    for k in (1, 4, 6):
        plain.reset(0)
        looked.reset(0)
        for t in range(len(prompt), len(seq) - 1, 3):
            before = looked.calls
            assert looked.propose(0, seq[:t], k) == plain.propose(0, seq[:t], k), (k, t)
            single += k >= 4 and looked.calls - before == 1
    assert looked.calls < plain.calls  # small random models repeat themselves: lookup guessed right
    assert single > 0  # a right guess rides in the call that catches the cache up: one call for k drafts
    # catching up on the prompt runs all its rows but asks the head (the largest matrix) for the logits of
    # the last text row and the guesses only
    assert max(rows for rows, _ in calls) >= len(prompt) and max(heads for _, heads in calls) <= 6


def test_a_long_catch_up_keeps_the_first_tokens_and_a_window(tiny_hf):
    """Where more than `catch_up` tokens are missing, the drafts are those of the draft model reading the
    text's first `sink` tokens and its last `catch_up` as a text of their own, and the call runs no more."""
    path = str(tiny_hf("llama"))
    loaded = load(path)
    config = EngineConfig(slots=1, ctx=160, spec_tokens=0)
    prompt = [(7 * i + 3) % 50 + 2 for i in range(40)]
    text = Engine.from_model(config=config, loaded=loaded).generate(
        prompt, SamplingParams(max_tokens=60, ignore_eos=True)
    )
    seq = prompt + list(text.token_ids)
    vocab = loaded.config.vocab_size
    windowed = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab, catch_up=8, sink=2)
    whole = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab, catch_up=None)
    rows = []
    decode = windowed.plan.decode
    windowed.plan.decode = lambda s, t, p, logit_rows=None: rows.append(len(t)) or decode(s, t, p, logit_rows)
    cut, k = 0, 4
    for t in [40, 43, 46, 49, 70, 72, 74, 99]:  # a prompt of 40, short steps, then two long gaps
        drafts = windowed.propose(0, seq[:t], k)
        if windowed.cut[0] != cut:  # a new window: the reference reads it from the start
            cut = windowed.cut[0]
            whole.reset(0)
            assert rows[-k] <= 2 + 8  # the catch-up ran the kept tokens only (then k-1 sequential drafts)
            assert cut == t - 8  # the window is the text's last catch_up tokens
        assert drafts == whole.propose(0, seq[:2] + seq[cut:t], k), t
    assert windowed.cuts == 3  # at 40 (the prompt), at 70 and at 99
    with pytest.raises(ValueError, match="catch_up"):
        ModelDrafter(whole.plan, vocab, catch_up=0)


def test_drafts_the_text_did_not_take_are_run_again_and_a_short_text_is_not_cut(tiny_hf):
    """The cache keeps only the drafts the text took: after a step that took none of them, the catch-up runs
    every new token, not only those past the drafts' places (which held the rejected drafts). And a text no
    longer than catch_up + sink is read whole: a window would repeat its first tokens."""
    loaded = load(str(tiny_hf("llama")))
    config = EngineConfig(slots=1, ctx=160, spec_tokens=0)
    vocab = loaded.config.vocab_size
    drafter = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab, catch_up=None)
    fresh = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab, catch_up=None)
    rows = []
    decode = drafter.plan.decode
    drafter.plan.decode = lambda s, t, p, logit_rows=None: rows.append(len(t)) or decode(s, t, p, logit_rows)
    prompt = [(7 * i + 3) % 50 + 2 for i in range(20)]
    drafts = drafter.propose(0, prompt, 4)
    text = prompt + [(d + 1) % vocab for d in drafts] + [5]  # none of the drafts, then one more token
    rows.clear()
    again = drafter.propose(0, text, 4)
    assert rows[0] == 5, rows  # the five new tokens
    assert again == fresh.propose(0, text, 4)
    short = ModelDrafter(fresh.plan, vocab, catch_up=8, sink=2)
    short.reset(0)
    short.propose(0, prompt[:10], 4)
    assert short.cuts == 0 and short.cut[0] == 0


def test_exactly_catch_up_missing_tokens_are_run_a_reset_forgets_the_window_and_drafts_stay_in_the_context(tiny_hf):
    """A catch-up of exactly `catch_up` tokens runs them (only more start a new window); a new request in the
    slot reads its own text whole, not through the last request's window; and no draft is made for a position
    past the plan's context."""
    loaded = load(str(tiny_hf("llama")))
    config = EngineConfig(slots=1, ctx=160, spec_tokens=0)
    vocab = loaded.config.vocab_size
    drafter = ModelDrafter(compile_plan(loaded, config, calibrate=False), vocab, catch_up=8, sink=2)
    fresh = ModelDrafter(drafter.plan, vocab, catch_up=8, sink=2)
    rows = []
    decode = drafter.plan.decode
    drafter.plan.decode = lambda s, t, p, logit_rows=None: rows.append(len(t)) or decode(s, t, p, logit_rows)
    prompt = [(7 * i + 3) % 50 + 2 for i in range(20)]
    drafts = drafter.propose(0, prompt, 4)
    assert drafter.cuts == 1 and drafter.cut[0] == 12
    text = prompt + [(drafts[0] + 1) % vocab] + [(5 * i + 1) % 50 + 2 for i in range(7)]  # 8 new, not the drafts
    rows.clear()
    drafter.propose(0, text, 1)
    assert drafter.cuts == 1 and rows == [8]
    drafter.reset(0)
    assert drafter.cut[0] == 0
    fresh.reset(0)
    assert drafter.propose(0, prompt[:6], 4) == fresh.propose(0, prompt[:6], 4)
    whole = ModelDrafter(drafter.plan, vocab, catch_up=None)
    whole.reset(0)
    assert len(whole.propose(0, [(3 * i + 1) % 50 + 2 for i in range(158)], 4)) == 2  # positions 158 and 159


def test_a_missing_draft_model_is_refused_before_the_target_compiles(tiny_hf, monkeypatch):
    import metronome.engine.engine as engine_module

    compiled = []
    monkeypatch.setattr(engine_module, "compile_plan", lambda *a, **k: compiled.append(a) or pytest.fail("compiled"))
    with pytest.raises(Exception, match="no-such-draft") as caught:
        Engine.from_model(str(tiny_hf("llama")), EngineConfig(draft="/no-such-draft.gguf"))
    assert getattr(caught.value, "param", None) == "draft" and not compiled

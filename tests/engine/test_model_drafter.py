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


def test_a_missing_draft_model_is_refused_before_the_target_compiles(tiny_hf, monkeypatch):
    import metronome.engine.engine as engine_module

    compiled = []
    monkeypatch.setattr(engine_module, "compile_plan", lambda *a, **k: compiled.append(a) or pytest.fail("compiled"))
    with pytest.raises(Exception, match="no-such-draft") as caught:
        Engine.from_model(str(tiny_hf("llama")), EngineConfig(draft="/no-such-draft.gguf"))
    assert getattr(caught.value, "param", None) == "draft" and not compiled

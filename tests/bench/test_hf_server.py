"""The transformers baseline peer (metronome/bench/hf_server.py) over a scripted backend: its OpenAI answers,
its refusals and its streams, in process (no model, no socket); and its generate() settings on a tiny model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import AsyncIterator, Iterator, Sequence

import httpx
import pytest

from metronome.bench.hf_server import ApiError, Backend, Generation, IncrementalDecoder, build_app

EOS = 0
PIECES = {EOS: b"</s>", 1: b" one", 2: b" two", 3: b" three", 4: "\u00e9".encode()[:1], 5: "\u00e9".encode()[1:]}


class ByteTokenizer:
    """ids -> bytes pieces, decoded as a Hugging Face tokenizer does: a cut character shows as U+FFFD."""

    pad_token_id = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i == EOS)]
        return b"".join(PIECES[i] for i in kept).decode("utf-8", errors="replace")


class ScriptedBackend:
    """Backend's interface: prompts are one id a word; `stream` yields the script's id lists, then raises
    `fail` if set. Every job it is given is kept."""

    def __init__(self, script: list[list[int]], context_length: int = 32, fail: Exception | None = None) -> None:
        self.script, self.context_length, self.fail = script, context_length, fail
        self.model_id, self.tokenizer, self.jobs = "scripted", ByteTokenizer(), []

    def encode_prompt(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def encode_chat(self, messages: Sequence[object]) -> list[int]:
        return [1] * sum(len(m.content.split()) for m in messages)

    async def stream(self, job: Generation) -> AsyncIterator[list[int]]:
        self.jobs.append(job)
        for ids in self.script:
            yield ids
        if self.fail is not None:
            raise self.fail


def post(backend: ScriptedBackend, path: str, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://hf") as http:
            return await http.post(path, json=body, timeout=10)

    return asyncio.run(go())


def events(response: httpx.Response) -> list:
    lines = [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_the_incremental_decoder_holds_back_half_a_character_and_never_repeats_text() -> None:
    decoder = IncrementalDecoder(ByteTokenizer())
    assert decoder.push([1]) == " one"
    assert decoder.push([4]) == ""  # the first byte of "é" alone: held back
    assert decoder.push([5]) == "\u00e9"
    assert decoder.push([EOS]) == ""  # special tokens are not text
    assert decoder.push([2, 3]) == " two three"


def test_a_stream_that_reaches_max_tokens_finishes_for_length_with_usage_then_done() -> None:
    body = {"prompt": "a b c", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    got = events(post(ScriptedBackend([[1], [4], [5]]), "/v1/completions", body))
    texts = [e["choices"][0]["text"] for e in got[:-3]]
    assert texts == [" one", "\u00e9"]  # no empty chunk for the held-back byte
    assert got[-3]["choices"][0]["finish_reason"] == "length" and got[-3]["choices"][0]["text"] == ""
    assert got[-2]["choices"] == []
    assert got[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert got[-1] == "[DONE]"


def test_an_output_cut_inside_a_character_keeps_its_last_tokens_text() -> None:
    """max_tokens ended the output after the first byte of "é": the held-back byte was never sent, in a stream
    or a whole answer, though the usage counted its token."""
    body = {"prompt": "a b c", "max_tokens": 2, "stream": True}
    got = events(post(ScriptedBackend([[1], [4]]), "/v1/completions", body))
    assert [e["choices"][0]["text"] for e in got[:-1]] == [" one", "\ufffd", ""]
    assert got[-2]["choices"][0]["finish_reason"] == "length"
    whole = post(ScriptedBackend([[1], [4]]), "/v1/completions", {**body, "stream": False}).json()
    assert whole["choices"][0]["text"] == " one\ufffd" and whole["usage"]["completion_tokens"] == 2


def test_a_stream_that_stops_early_finishes_for_stop_and_sends_no_usage_unasked() -> None:
    body = {"prompt": "a b c", "max_tokens": 4, "stream": True}
    got = events(post(ScriptedBackend([[1], [2], [3]]), "/v1/completions", body))
    assert got[-2]["choices"][0]["finish_reason"] == "stop" and "usage" not in got[-2]
    assert got[-1] == "[DONE]" and not any("usage" in e for e in got[:-1])
    assert all("role" not in json.dumps(e) for e in got[:-1])  # a completion stream has no role chunk


def test_a_chat_stream_opens_with_the_role_and_finishes_with_an_empty_delta() -> None:
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2, "stream": True}
    got = events(post(ScriptedBackend([[1], [2]]), "/v1/chat/completions", body))
    assert got[0]["choices"][0]["delta"] == {"role": "assistant"} and got[0]["object"] == "chat.completion.chunk"
    assert [e["choices"][0]["delta"] for e in got[1:3]] == [{"content": " one"}, {"content": " two"}]
    assert got[3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert got[4] == "[DONE]"


def test_whole_answers_count_their_tokens_and_name_their_object() -> None:
    whole = post(ScriptedBackend([[1], [2]]), "/v1/completions", {"prompt": "a", "max_tokens": 2}).json()
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == " one two"
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answer = post(ScriptedBackend([[1], [2]]), "/v1/chat/completions", chat).json()
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": " one two"}


def test_a_generation_that_fails_is_reported_and_a_stream_ends_without_a_finish() -> None:
    failing = ScriptedBackend([[1]], fail=RuntimeError("out of memory"))
    whole = post(failing, "/v1/completions", {"prompt": "a", "max_tokens": 4})
    assert whole.status_code == 500 and "RuntimeError: out of memory" in whole.json()["error"]["message"]
    got = events(post(failing, "/v1/completions", {"prompt": "a", "max_tokens": 4, "stream": True}))
    assert got[0]["choices"][0]["text"] == " one"
    assert got[-1]["error"]["type"] == "server_error" and "out of memory" in got[-1]["error"]["message"]
    assert len(got) == 2  # no finish chunk and no [DONE] after the error


def test_max_tokens_must_fit_the_context_and_defaults_to_the_room_left() -> None:
    backend = ScriptedBackend([])  # a context of 32 tokens
    full = post(backend, "/v1/completions", {"prompt": " ".join(["w"] * 32), "max_tokens": 1})
    assert full.status_code == 400 and "the context holds 32" in full.json()["error"]["message"]
    assert post(backend, "/v1/completions", {"prompt": " ".join(["w"] * 31), "max_tokens": 1}).status_code == 200
    assert post(backend, "/v1/completions", {"prompt": " ".join(["w"] * 30), "max_tokens": 2}).status_code == 200
    over = post(backend, "/v1/completions", {"prompt": " ".join(["w"] * 30), "max_tokens": 3})
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    assert "ask for at most 2" in over.json()["error"]["message"]
    assert (
        post(backend, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c"}]}).status_code == 200
    )
    assert backend.jobs[-1].max_tokens == 29  # no limit asked: the room the prompt leaves
    unbounded = ScriptedBackend([], context_length=0)  # a model that states no context: 256 by default
    assert post(unbounded, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert unbounded.jobs[-1].max_tokens == 256


def test_max_completion_tokens_wins_over_max_tokens_and_the_settings_reach_the_job() -> None:
    backend = ScriptedBackend([])
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "max_completion_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "ignore_eos": True,
    }
    assert post(backend, "/v1/chat/completions", body).status_code == 200
    job = backend.jobs[-1]
    assert (job.max_tokens, job.temperature, job.top_p, job.seed, job.ignore_eos) == (3, 0.5, 0.9, 7, True)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 0}, "n"), ({"n": 2}, "n"), ({"stop": "."}, "stop"), ({"stop": ["\n"]}, "stop"), ({"top_p": 0}, "top_p")],
)
def test_settings_this_server_cannot_honour_are_refused_naming_them(extra: dict, param: str) -> None:
    backend = ScriptedBackend([[1]])
    refused = post(backend, "/v1/completions", {"prompt": "a", "max_tokens": 1, **extra})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert refused.json()["error"]["type"] == "invalid_request_error" and backend.jobs == []


def test_zero_max_tokens_is_refused_and_an_empty_stop_list_is_no_stop() -> None:
    zero = post(ScriptedBackend([[1]]), "/v1/completions", {"prompt": "a", "max_tokens": 0})
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_tokens"
    assert post(ScriptedBackend([[1]]), "/v1/completions", {"prompt": "a", "stop": []}).status_code == 200


def test_a_tokenizer_without_a_chat_template_refuses_chat() -> None:
    backend = Backend(SimpleNamespace(config=SimpleNamespace()), SimpleNamespace(chat_template=None), "plain")
    try:
        assert backend.context_length == 0
        with pytest.raises(ApiError) as refused:
            backend.encode_chat([])
        assert refused.value.status == 400 and refused.value.param == "messages"
    finally:
        backend.close()


def _collect(backend: Backend, job: Generation, first_only: bool = False) -> list[list[int]]:
    async def go() -> list[list[int]]:
        got = []
        stream = backend.stream(job)
        async for ids in stream:
            got.append(ids)
            if first_only:
                break
        await stream.aclose()
        return got

    return asyncio.run(asyncio.wait_for(go(), timeout=20))


JOB = Generation(prompt_ids=(1, 2, 3), max_tokens=4, temperature=0.0, top_p=1.0, seed=None, ignore_eos=False)


def test_the_worker_streams_ids_ends_forwards_failures_and_cancels_a_stream_left_early(monkeypatch) -> None:
    cancels = []

    def run(self, job, cancel, emit) -> None:
        cancels.append(cancel)
        for token in range(job.max_tokens):
            emit([token])
        if job.seed == 13:
            raise ValueError("bad seed")

    monkeypatch.setattr(Backend, "_run_generate", run)
    backend = Backend(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)), ByteTokenizer(), "m")
    try:
        assert backend.context_length == 64
        assert _collect(backend, JOB) == [[0], [1], [2], [3]]  # then the end: no wait past the last id
        assert cancels[-1].is_set()
        with pytest.raises(ValueError, match="bad seed"):
            _collect(backend, Generation((1,), 2, 0.0, 1.0, 13, False))
        assert _collect(backend, JOB, first_only=True) == [[0]]
        assert cancels[-1].is_set()  # the client left: its generation stops at the next token
    finally:
        backend.close()


@pytest.fixture(scope="module")
def tiny_backend() -> Iterator[Backend]:
    """A random one-layer Llama (vocabulary 64); no tokenizer: Backend.stream yields ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    backend = Backend(model, SimpleNamespace(pad_token_id=None), "tiny")
    yield backend
    backend.close()


def test_generate_is_greedy_at_temperature_zero_and_a_seed_repeats_a_sampled_run(tiny_backend: Backend) -> None:
    import torch

    torch.manual_seed(1)
    greedy = _collect(tiny_backend, JOB)
    torch.manual_seed(2)
    assert _collect(tiny_backend, JOB) == greedy and len(greedy) == 4
    sampled = Generation((1, 2, 3), 8, 1.0, 1.0, 0, True)
    torch.manual_seed(3)
    first = _collect(tiny_backend, sampled)
    torch.manual_seed(4)
    assert _collect(tiny_backend, sampled) == first  # seed 0 is a seed
    assert first != _collect(tiny_backend, Generation((1, 2, 3), 8, 1.0, 1.0, 5, True))


def test_ignore_eos_generates_past_the_end_token(tiny_backend: Backend) -> None:
    config = tiny_backend.model.generation_config
    saved = config.eos_token_id
    first = _collect(tiny_backend, JOB)[0][0]
    try:
        config.eos_token_id = [first]  # the greedy first token is now the end (a list, as some models give)
        assert _collect(tiny_backend, JOB) == [[first]]
        assert len(_collect(tiny_backend, Generation((1, 2, 3), 4, 0.0, 1.0, None, True))) == 4
    finally:
        config.eos_token_id = saved


class SpecialsTokenizer:
    """A Hugging Face tokenizer's contract in small: BOS (id 1) added on request, one id a word (its length),
    a chat template that opens the assistant's reply when asked to."""

    chat_template = "role: content"

    def __call__(self, text: str, add_special_tokens: bool) -> dict:
        return {"input_ids": [1] * add_special_tokens + [len(word) for word in text.split()]}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool, tokenize: bool) -> str:
        assert not tokenize
        rendered = " ".join(f"{m['role']}: {m['content']}" for m in messages)
        return rendered + " assistant:" * add_generation_prompt


def test_a_prompt_gets_the_tokenizers_specials_and_a_chat_its_template_with_the_reply_opened() -> None:
    from metronome.bench.hf_server import ChatMessage

    backend = Backend(SimpleNamespace(config=SimpleNamespace()), SpecialsTokenizer(), "m")
    try:
        assert backend.encode_prompt("ab c") == [1, 2, 1]
        # "user: hello assistant:": the template holds the specials; none are added
        assert backend.encode_chat([ChatMessage(role="user", content="hello")]) == [5, 5, 10]
    finally:
        backend.close()


def test_the_command_refuses_zero_threads_and_a_missing_model(tmp_path, capsys) -> None:
    from metronome.bench.hf_server import main

    with pytest.raises(SystemExit) as refused:
        main(["--model", str(tmp_path), "--threads", "0"])
    assert refused.value.code == 2 and "--threads must be at least 1" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "absent.gguf")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "weights.bin").write_bytes(b"")
    assert main(["--model", str(tmp_path / "weights.bin")]) == 2
    assert "give a .gguf file" in capsys.readouterr().err

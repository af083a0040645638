"""serve/responses.py's bodies and chunks on a stand-in tokenizer (token t is the text "w<t>" and its bytes,
token 9 half a character): finish reasons with tools, streamed logprobs that list every token once, and
the objects each API names its chunks."""

from __future__ import annotations

from types import SimpleNamespace

from metronome.engine.sampler import Choice
from metronome.serve.jobs import ChoiceRun
from metronome.serve.responses import ResponseHead, ResponseShape
from metronome.serve.tools import call_block

HEAD = ResponseHead("id", 0, "m", "fp")


class WordTokenizer:
    def token_text(self, t: int) -> str:
        return "\ufffd" if t == 9 else f"w{t}"

    def token_bytes(self, t: int) -> bytes:
        return b"\xf0\x9f" if t == 9 else f"w{t}".encode()


def shape(chat: bool = True, tools: bool = False, logprobs: bool = True) -> ResponseShape:
    return ResponseShape(HEAD, chat, WordTokenizer(), logprobs, 1, tools=tools)


def run(text: str, finish: str | None) -> ChoiceRun:
    return ChoiceRun(0, SimpleNamespace(prompt_ids=[1]), text=text, finish_reason=finish)


def choice(t: int) -> Choice:
    return Choice(t, -0.5, ((t, -0.5),))


def test_calls_cut_by_the_token_budget_end_with_length_not_tool_calls():
    """OpenAI says "tool_calls" only when the answer ended by making its calls; a second call cut by max_tokens
    after a whole first one is "length" (the client must not run the calls as if the answer were complete)."""
    text = call_block("add", {"a": 1}) + '\n<tool_call>\n{"name": "ad'
    body = shape(tools=True, logprobs=False).whole([run(text, "length")], {})
    (c,) = body["choices"]
    assert c["message"]["tool_calls"] and c["finish_reason"] == "length"
    done = shape(tools=True, logprobs=False).whole([run(call_block("add", {"a": 1}), "stop")], {})
    assert done["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_logprobs_with_tools_list_each_token_once():
    """With tools the text goes through the call parser: a token whose text it holds back (a possible tag)
    still gets a chunk for its logprobs, and an event that makes several deltas carries its tokens' logprobs
    on one of them only."""
    s = shape(tools=True)
    r = run("", None)
    chunks = s.delta_chunks(r, "<tool", [choice(1)], None)  # held: it may begin <tool_call>
    chunks += s.delta_chunks(r, "_call>\n", [choice(2)], None)
    chunks += s.delta_chunks(r, '{"name": "add", "arguments": {"a": 1}}\n</tool_call>', [choice(3)], "stop")
    listed = [
        e["token"] for ch in chunks if ch["choices"][0]["logprobs"] for e in ch["choices"][0]["logprobs"]["content"]
    ]
    assert listed == ["w1", "w2", "w3"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_token_whose_text_is_held_back_still_streams_its_logprobs():
    s = shape(chat=False)
    chunks = s.delta_chunks(run("", None), "", [choice(9)], None)  # half a character: no text yet
    assert [ch["choices"][0]["logprobs"]["tokens"] for ch in chunks] == [["bytes:\\xf0\\x9f"]]


def test_chunk_objects_and_the_last_chat_delta():
    """Chat stream chunks are chat.completion.chunk and the finishing chunk's delta is empty, as OpenAI sends
    them; legacy completions' stream chunks are text_completion, like its whole bodies."""
    chat = shape(logprobs=False).delta_chunk(0, "", [], "stop")
    assert chat["object"] == "chat.completion.chunk" and chat["choices"][0]["delta"] == {}
    legacy = shape(chat=False, logprobs=False).delta_chunk(0, "x", [], None)
    assert legacy["object"] == "text_completion"


def test_a_chat_logprob_has_its_tokens_bytes_not_its_texts():
    """A token holding half a character shows U+FFFD as its text; its bytes are its own."""
    body = shape().whole(
        [ChoiceRun(0, SimpleNamespace(prompt_ids=[1]), text="", tokens=[choice(9)], finish_reason="length")], {}
    )
    (entry,) = body["choices"][0]["logprobs"]["content"]
    assert entry["token"] == "\ufffd" and entry["bytes"] == [0xF0, 0x9F]
    assert entry["top_logprobs"] == [{"token": "\ufffd", "logprob": -0.5, "bytes": [0xF0, 0x9F]}]

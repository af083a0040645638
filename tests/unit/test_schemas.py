"""serve/schemas.py on its own: the edges of each range are accepted (OpenAI's documented limits are
inclusive), what lies past them is refused naming the parameter, and a message reaches the template as it
should."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from metronome.config import MAX_STOP_CHARS
from metronome.serve.schemas import ChatBody, CompletionBody, Message, error_param

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 2.0},
        {"top_p": 1.0},
        {"n": 16},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": "x" * MAX_STOP_CHARS},
        {"logprobs": True, "top_logprobs": 20},
        {"logprobs": True, "top_logprobs": 0},
        {"logit_bias": {"262143": -100}},  # a large vocabulary's id (Gemma 3's is 262k)
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(128)]},
        {"n": 2.0, "max_tokens": 3.0},  # JSON has one number type: 2.0 is the integer 2
    ],
    ids=[
        "temperature",
        "top_p",
        "n",
        "stops",
        "stop_chars",
        "top_logprobs",
        "top_logprobs_0",
        "logit_bias",
        "tools",
        "int",
    ],
)
def test_chat_values_at_the_edge_of_their_range_are_accepted(fields):
    body = ChatBody.model_validate({"messages": MSG, **fields})
    if "max_tokens" in fields:
        assert (body.n, body.max_tokens) == (2, 3) and isinstance(body.n, int)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 1.01}, "top_p"),
        ({"n": 17}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"1234567890": 1}}, "logit_bias"),
        ({"n": 2.5}, "n"),
    ],
    ids=str,
)
def test_chat_values_past_their_range_are_refused_naming_the_parameter(fields, param):
    with pytest.raises(ValidationError) as err:
        ChatBody.model_validate({"messages": MSG, **fields})
    assert error_param(err.value) == param


def test_legacy_logprobs_and_best_of_edges():
    assert CompletionBody.model_validate({"prompt": "x", "logprobs": 20}).logprobs == 20
    assert CompletionBody.model_validate({"prompt": "x", "best_of": 2, "n": 2}).best_of == 2
    # best_of other than n is refused either way: fewer than n was never a way to ask for n choices
    for best_of, n in ((3, 1), (1, 2)):
        with pytest.raises(ValidationError) as err:
            CompletionBody.model_validate({"prompt": "x", "n": n, "best_of": best_of})
        assert error_param(err.value) == "best_of"


def test_stream_options_without_include_usage_leave_usage_out():
    assert not ChatBody.model_validate({"messages": MSG, "stream": True, "stream_options": {}}).include_usage
    assert ChatBody.model_validate({"messages": MSG, "stream_options": {"include_usage": True}}).include_usage


def test_a_message_reaches_the_template_as_it_reads_it():
    """developer is the newer system; a name is passed only on tool results (a user's name is not a field
    every template renders)."""
    developer = Message.model_validate({"role": "developer", "content": "Be brief."}).as_template_message()
    assert developer == {"role": "system", "content": "Be brief."}
    user = Message.model_validate({"role": "user", "content": [{"type": "text", "text": "a"}], "name": "ann"})
    assert user.as_template_message() == {"role": "user", "content": "a"}
    tool = Message.model_validate({"role": "tool", "content": "5", "tool_call_id": "c1", "name": "add"})
    assert tool.as_template_message() == {"role": "tool", "content": "5", "tool_call_id": "c1", "name": "add"}

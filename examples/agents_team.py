"""Agents calling agents on one metronome server: a planning agent calls specialist agents as tools, at
once, and the same team is timed with the specialists run one after another.

Start a server (Qwen2.5-Coder's chat template knows tools; the default SmolLM2 is too weak to plan):

    metronome serve --model $(metronome models path qwen2.5-coder-0.5b) --slots 4 --ctx 4096

then run

    python examples/agents_team.py --base-url http://127.0.0.1:8000/v1 --rounds 3

The planner (OpenAI Agents SDK, default Responses API) gets the task and must call its tools first
(`tool_choice="required"`, `parallel_tool_calls=True`): it asks each specialist (`agent.as_tool`) in one
turn, the SDK runs those calls concurrently, each is its own `/v1/responses` request and takes a slot of
the server's fixed set, and the planner then writes the answer from what they returned. In the
"one after another" mode the very same tools wait for each other (a lock around each call), so only
the concurrency differs: greedy decoding with a seed gives the same tool calls and the same specialist
answers in both modes (the server's outputs do not depend on which requests share a step), which the
program checks. It prints each mode's end-to-end latency per round, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from agents import Agent, ModelSettings, OpenAIResponsesModel, RunHooks, Runner, set_tracing_disabled
from agents.tool import FunctionTool
from openai import AsyncOpenAI

SPECIALISTS = (
    (
        "write_code",
        "Writes the Python function the task asks for.",
        "You write one short Python function for the task you are given. Answer with the code only, no explanation.",
    ),
    (
        "write_tests",
        "Writes pytest tests for the task.",
        "You write two short pytest test functions for the task "
        "you are given. Answer with the code only, no explanation.",
    ),
    (
        "write_docs",
        "Writes the user documentation for the task.",
        "You write a three-sentence description, for a "
        "user, of a Python function that does the task you are given. Answer with the description only.",
    ),
)
PLANNER = (
    "You lead a team of specialists. For the task you are given, call every one of your tools in the same turn "
    "(write_code, write_tests and write_docs), each with the task as its input. Once they have answered, "
    "reply with one short sentence saying what the team produced."
)
TASK = "A function is_palindrome(s: str) -> bool that ignores case and spaces."


@dataclass
class Record(RunHooks):
    """What one run did: the tool calls it made, what each returned, and when the specialists worked."""

    calls: list[tuple[str, str]] = field(default_factory=list)  # (tool, its output) in order of completion
    first_start: float | None = None
    last_end: float | None = None

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter()

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: str) -> None:
        self.calls.append((tool.name, str(result)))
        self.last_end = time.perf_counter()

    @property
    def tools_s(self) -> float:
        """From the first specialist's start to the last one's end (NaN: no tool ran)."""
        if self.first_start is None or self.last_end is None:
            return float("nan")
        return self.last_end - self.first_start


def one_at_a_time(tool: FunctionTool, lock: asyncio.Lock) -> FunctionTool:
    """The same tool, but each call waits for the one before it to end."""

    async def invoke(context: Any, arguments: str) -> Any:
        async with lock:
            return await tool.on_invoke_tool(context, arguments)

    return dataclasses.replace(tool, on_invoke_tool=invoke)


def team(client: AsyncOpenAI, model: str, sequential: bool, args: argparse.Namespace) -> Agent:
    def settings(max_tokens: int, **extra: Any) -> ModelSettings:
        return ModelSettings(temperature=0, max_tokens=max_tokens, extra_body={"seed": args.seed}, **extra)

    responses = OpenAIResponsesModel(model=model, openai_client=client)
    tools = [
        Agent(name=name, instructions=instructions, model=responses, model_settings=settings(args.max_tokens)).as_tool(
            tool_name=name, tool_description=description
        )
        for name, description, instructions in SPECIALISTS
    ]
    if sequential:
        lock = asyncio.Lock()
        tools = [one_at_a_time(t, lock) for t in tools]
    return Agent(
        name="planner",
        instructions=PLANNER,
        model=responses,
        tools=tools,
        model_settings=settings(args.planner_tokens, tool_choice="required", parallel_tool_calls=True),
    )


async def run_once(
    client: AsyncOpenAI, model: str, sequential: bool, args: argparse.Namespace
) -> tuple[float, Record, str]:
    record = Record()
    start = time.perf_counter()
    result = await Runner.run(team(client, model, sequential, args), args.task, hooks=record, max_turns=4)
    return time.perf_counter() - start, record, str(result.final_output)


async def main_async(args: argparse.Namespace) -> int:
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    times: dict[str, list[float]] = {"concurrent": [], "one after another": []}
    tool_times: dict[str, list[float]] = {mode: [] for mode in times}
    first: dict[str, Record] = {}
    for _ in range(args.warmup):  # untimed: both modes then find the same prompts in the prefix cache
        await run_once(client, model, False, args)
    for r in range(args.rounds):
        for mode in times:  # interleaved, so drifts of the machine hit both modes alike
            seconds, record, answer = await run_once(client, model, mode != "concurrent", args)
            times[mode].append(seconds)
            tool_times[mode].append(record.tools_s)
            first.setdefault(mode, record)
            tools = ", ".join(name for name, _ in record.calls)
            print(
                f"round {r + 1} {mode:>17}: {seconds:6.2f} s end to end, specialists {record.tools_s:6.2f} s  "
                f"(tools called: {tools or 'none'})"
            )
            if r == 0 and args.verbose:
                for name, output in record.calls:
                    print(f"    --- {name} ---\n    " + output.strip().replace("\n", "\n    "))
                print(f"    --- planner ---\n    {answer.strip()}")
    together, apart = (statistics.median(v) for v in times.values())
    tools_together, tools_apart = (statistics.median(v) for v in tool_times.values())
    same = sorted(first["concurrent"].calls) == sorted(first["one after another"].calls)
    print(
        f"\nmedians over {args.rounds} rounds: end to end: concurrent {together:.2f} s, one after another "
        f"{apart:.2f} s ({apart / together:.2f}x); the specialists alone: {tools_together:.2f} s vs "
        f"{tools_apart:.2f} s ({tools_apart / tools_together:.2f}x)\n"
        f"same tool calls and answers in both modes: {same}"
    )
    return 0 if same else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--model", default=None, help="the served model's name (default: the first one listed)")
    p.add_argument("--task", default=TASK)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (the server's caches warm up)")
    p.add_argument("--max-tokens", type=int, default=160, help="max_output_tokens of each specialist")
    p.add_argument("--planner-tokens", type=int, default=200, help="max_output_tokens of the planner")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one HTTP request may take")
    p.add_argument("--verbose", action="store_true", help="print what each agent answered in the first round")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())

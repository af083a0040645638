"""The one interface a compiled plan runs through (`Runner`), and its torch implementation.

A runner turns token rows into logits. Two implement it:
- `fused.FusedRunner` (CPU, int4/int8 blocks, the C++ decoder): every row is independent of the others
  by construction, so a step may hold any rows: one per live slot, a prompt's tokens, drafts to verify.
- `TorchRunner` (any device and weight format): the pure `Transformer` with weight-only quantized
  linears, one row per live slot. Its decode shape is chosen by the plan's probe (probe.py): "compact"
  (only the live rows) where every kernel is row-count invariant on the real weights, else "fixed"
  (every slot is a row every step, so each row always meets the same shapes).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from metronome.compile.quant import Int4Linear, Int8Linear, Q8Linear
from metronome.config import EngineConfig
from metronome.model.moe import MoE, Router, active_weight_bytes
from metronome.model.transformer import KVCache, Rows, Transformer


class Runner(Protocol):
    """What the plan asks of whatever computes a step."""

    any_rows: bool  # True: a step may mix any rows (several of one slot: drafts); False: one per live slot
    weight_bytes: int  # bytes of weights one decode step reads (every matrix once, plus one embedding row)
    decode_mode: str  # "compact" (live rows only) or "fixed" (every slot, every step)

    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into `slot` from position 0: logits of its last position (V,), or of all (T, V)."""

    def prefill_hidden(self, ids: list[int], slot: int) -> torch.Tensor:
        """Run a prompt as `prefill` does: the last layer's output at every position (T, D), for `head`."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the last layer's output (M, D) -> logits (M, V) float32, each row's bits those `prefill`
        gives a row (its last row's, for the last position)."""

    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        """One row per entry (slot, token, position): logits (rows, V) float32 in the same order, or only
        of the rows listed in `logit_rows` (a prompt chunk's rows need none but the prompt's last)."""

    def install_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """KV (layers, kv_heads, T, head_dim) computed by another process (a prefill worker) into `slot`
        from position `start`: what a prefill of those positions would have written."""

    def read_kv(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of `slot`'s KV at positions 0..n-1, every KV head (layers, kv_heads, n, head_dim): what
        `install_kv` takes (the prefix cache's pages for a prefill worker)."""

    def close(self) -> None:
        """Release what the runner started beside this process (a tensor-parallel plan's ranks)."""


class TorchRunner:
    """The torch `Transformer` on static step buffers (filled in place each step; CUDA graphs replay them)."""

    any_rows = False

    def __init__(self, model: Transformer, cache: KVCache, config: EngineConfig) -> None:
        self.model, self.cache, self.config = model, cache, config
        self.device = torch.device(config.device)
        S = config.slots
        self._tokens = torch.zeros(S, 1, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(S, 1, dtype=torch.long, device=self.device)
        self._slot_ids = torch.arange(S, dtype=torch.long, device=self.device)  # constant: row b is slot b
        self._row_slots = torch.zeros(S, dtype=torch.long, device=self.device)  # compact: slot of each row
        self.decode_mode = "fixed"
        self.graphs: dict[int, CudaGraph] = {}  # captured decode steps by row count (CUDA)
        self.weight_bytes = _weight_bytes_per_step(model)

    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        rows = Rows((0,), (slot,), (0,))
        logits = self.model(tokens, positions, self.cache, rows, self._slot_ids[slot : slot + 1], all_logits=all_logits)
        return logits[0]

    def prefill_hidden(self, ids: list[int], slot: int) -> torch.Tensor:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        rows = Rows((0,), (slot,), (0,))
        return self.model(tokens, positions, self.cache, rows, self._slot_ids[slot : slot + 1], hidden=True)[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)

    def install_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        self.cache.write(slot, k.to(self.cache.k.device), v.to(self.cache.v.device), start)

    def read_kv(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.read(slot, n)

    def close(self) -> None:  # nothing beside this process
        pass

    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        logits = self._decode(slots, tokens, positions)
        return logits if logit_rows is None or len(logit_rows) == len(slots) else logits[logit_rows]

    def _decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        n = len(slots)
        if self.decode_mode == "compact":
            self._tokens[:n, 0] = torch.tensor(tokens)
            self._positions[:n, 0] = torch.tensor(positions)
            self._row_slots[:n] = torch.tensor(slots)
            return self._run_static(n)
        # fixed: every slot is a row (row b is slot b); idle rows run on token 0 at position 0 of their own slot
        self._tokens.zero_()
        self._positions.zero_()
        index = torch.tensor(slots, device=self.device)
        self._tokens[index, 0] = torch.tensor(tokens, device=self.device)
        self._positions[index, 0] = torch.tensor(positions, device=self.device)
        return self._run_static(self.config.slots)[index]

    def _static_step(self, n: int) -> torch.Tensor:
        """The decode step on the static input buffers: rows 0..n-1 (compact) or every slot (fixed, n = slots).
        Shapes and addresses never change, so it can be captured as a CUDA graph."""
        slot_index = self._row_slots[:n] if self.decode_mode == "compact" else self._slot_ids
        return self.model(self._tokens[:n], self._positions[:n], self.cache, _NO_ROWS, slot_index)

    def _run_static(self, n: int) -> torch.Tensor:
        graph = self.graphs.get(n)
        return graph.replay() if graph is not None else self._static_step(n)

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """CUDA: capture the decode step once per row count it can run with (fixed: all slots; compact: 1..slots)."""
        counts = [self.config.slots] if self.decode_mode == "fixed" else range(1, self.config.slots + 1)
        self.graphs = {n: CudaGraph(lambda n=n: self._static_step(n)) for n in counts}


_NO_ROWS = Rows((), (), ())  # a decode step (T = 1) attends by slot_index and positions; Rows serve prefill


class CudaGraph:
    """One decode shape captured as a CUDA graph: `replay()` reruns every kernel of the step on whatever the
    static buffers hold, with no Python or launch overhead, and returns a copy of the logits."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph (allocator, library handles)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


def _weight_bytes_per_step(model: Transformer) -> int:
    """Bytes of weights one token's decode step reads: every linear layer's matrix, plus one embedding row;
    of an MoE model's routed experts only the `experts_per_token` active ones (moe.active_weight_bytes)."""
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear, Q8Linear)):
            total += m.nbytes
        elif isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.nbytes + (m.bias.nbytes if m.bias is not None else 0)
        elif isinstance(m, Router):  # MoE routers and shared-expert gates (float32, always read)
            total += m.weight.nbytes
    experts = sum(_linear_bytes(e) for m in model.modules() if isinstance(m, MoE) for e in m.experts)
    emb = model.embed.weight
    return active_weight_bytes(total, experts, model.cfg) + emb[0].nbytes


def _linear_bytes(module: torch.nn.Module) -> int:
    """Bytes of the linear layers inside `module` (an expert)."""
    return sum(
        m.nbytes if isinstance(m, (Int4Linear, Int8Linear, Q8Linear)) else m.weight.nbytes
        for m in module.modules()
        if isinstance(m, (Int4Linear, Int8Linear, Q8Linear, torch.nn.Linear))
    )

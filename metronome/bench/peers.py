"""Peer servers started by the bench: each an OpenAI-compatible server on its own loopback port.

Peers are started one at a time (each must answer its readiness check before the next starts, so
model loading never overlaps) and then all stay up for the whole run; the runner measures one
target at a time while the others sit idle. Keeping them up is what makes interleaved rounds
(A B C A B C ...) affordable: restarting a peer per round would add a model load (seconds for
transformers, a plan compile for metronome) per round and measure cold caches. The cost is memory
for every model at once, which the small models this is meant for can afford; an idle peer uses
no CPU. Every peer gets the same thread count (`OMP_NUM_THREADS`, and the peer's own flag where it
has one), and metronome and llama.cpp the same context length, sized to the workload by
`context_for` (a prompt counted at ~4 chars/token may run longer in the model's tokens).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx

from metronome.bench.workloads import Workload

LLAMA_CPP_INSTALL = 'pip install "llama-cpp-python[server]==0.3.36"'


class Peer(enum.Enum):
    METRONOME = "metronome"
    LLAMA_CPP = "llama.cpp"
    TRANSFORMERS = "transformers"


def parse_peers(text: str) -> tuple[Peer, ...]:
    """`metronome,llama.cpp,transformers` → peers, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {peer.value: peer for peer in Peer}
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise ValueError(
            f"--compare {text!r}: unknown peer(s) {unknown or '(none given)'}; choose from {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--compare {text!r} names a peer twice")
    return tuple(known[name] for name in names)


@dataclass(frozen=True)
class PeerLaunch:
    """How to start one peer and how to tell that it is ready."""

    peer: Peer
    argv: tuple[str, ...]
    ready_path: str
    port: int


def _metronome_command() -> list[str]:
    beside = Path(sys.executable).with_name("metronome")
    found = str(beside) if beside.exists() else shutil.which("metronome")
    if found is None:
        raise PeerUnavailable(
            "the metronome peer needs the `metronome` command; install the package (pip install -e .) in this Python"
        )
    return [found]


def context_for(workload: Workload) -> int:
    """Context tokens per request for `workload`: the prompt with a 50 % margin (tokenizers differ
    from the 4 chars/token estimate, and chat templates add tokens), the output, rounded up to 256."""
    needed = workload.input_tokens * 3 // 2 + workload.output_tokens + 64
    return -(-needed // 256) * 256


def launch_spec(
    peer: Peer,
    model: Path,
    port: int,
    threads: int,
    hf_dtype: str,
    context: int,
    metronome_flags: Sequence[str] = (),
) -> PeerLaunch:
    """The command line of `peer` serving `model` on 127.0.0.1:`port` (`metronome_flags`: more engine flags
    for metronome's server, as the bench was given them: args.engine_argv)."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    match peer:
        case Peer.METRONOME:
            options = ["--threads", str(threads), "--ctx", str(context), *metronome_flags]
            argv = [*_metronome_command(), "serve", "--model", str(model), *options, *host]
            ready = "/health"
        case Peer.LLAMA_CPP:
            threading = ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
            options = [*threading, "--n_ctx", str(context)]
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), *options, *host]
            ready = "/v1/models"
        case Peer.TRANSFORMERS:
            options = ["--threads", str(threads), "--dtype", hf_dtype]
            argv = [sys.executable, "-m", "metronome.bench.hf_server", "--model", str(model), *options, *host]
            ready = "/health"
    return PeerLaunch(peer=peer, argv=tuple(argv), ready_path=ready, port=port)


class PeerUnavailable(RuntimeError):
    """A peer cannot be started here; the message says what to install or fix."""


def check_available(peer: Peer) -> None:
    """Raise PeerUnavailable (with the install command) when `peer`'s software is missing."""
    if peer is Peer.LLAMA_CPP:
        missing = [
            m for m in ("llama_cpp", "sse_starlette", "starlette_context") if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise PeerUnavailable(
                f"the llama.cpp peer needs llama-cpp-python's server (missing: {', '.join(missing)}); "
                f"install it with `{sys.executable} -m {LLAMA_CPP_INSTALL}` (builds from source, ~5 minutes), "
                "or leave llama.cpp out of --compare"
            )
    elif peer is Peer.TRANSFORMERS:
        missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise PeerUnavailable(
                f"the transformers peer needs {' and '.join(missing)} (pip install transformers accelerate)"
            )
    elif peer is Peer.METRONOME:
        _metronome_command()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PeerStartError(RuntimeError):
    """A peer exited or never became ready; the message carries its log's tail."""


@dataclass(frozen=True)
class RunningPeer:
    peer: Peer
    base_url: str
    argv: tuple[str, ...]
    log_path: Path


def _log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_ready(
    process: subprocess.Popen, url: str, timeout_s: float, log_path: Path, name: str, poll_s: float = 0.25
) -> None:
    """Poll `url` until it answers 200; raise PeerStartError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise PeerStartError(
                    f"peer {name} exited with code {code} before it was ready; last lines of {log_path}:\n"
                    + _log_tail(log_path)
                )
            try:
                response = http.get(url)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(poll_s)
    raise PeerStartError(
        f"peer {name} was not ready at {url} after {timeout_s:g} s (last: {last}); raise --startup-timeout "
        f"or read {log_path}:\n" + _log_tail(log_path)
    )


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_peers(
    peers: Sequence[Peer],
    model: Path,
    threads: int,
    hf_dtype: str,
    context: int,
    log_dir: Path,
    startup_timeout_s: float,
    notify: Callable[[str], None],
    metronome_flags: Sequence[str] = (),
) -> Iterator[list[RunningPeer]]:
    """Start `peers` one after another on free loopback ports; stop them all on exit."""
    for peer in peers:
        check_available(peer)
    if not model.exists():
        raise FileNotFoundError(f"--model {model}: no such file or folder")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with contextlib.ExitStack() as stack:
        started: list[RunningPeer] = []
        for peer in peers:
            launch = launch_spec(peer, model, free_port(), threads, hf_dtype, context, metronome_flags)
            log_path = log_dir / f"peer-{peer.value}.log"
            log = stack.enter_context(open(log_path, "w", encoding="utf-8"))
            notify(f"starting {peer.value}: {' '.join(launch.argv)}")
            # A new session: Ctrl-C reaches the bench only, and the bench stops its peers itself.
            process = subprocess.Popen(
                launch.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            stack.callback(_stop, process)
            base_url = f"http://127.0.0.1:{launch.port}"
            began = time.monotonic()
            wait_ready(process, base_url + launch.ready_path, startup_timeout_s, log_path, peer.value)
            notify(f"{peer.value} ready at {base_url} after {time.monotonic() - began:.1f} s")
            started.append(RunningPeer(peer=peer, base_url=base_url, argv=launch.argv, log_path=log_path))
        yield started

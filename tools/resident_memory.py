"""Resident memory of one process that loads and compiles a model (docs/performance.md, block formats).

    python tools/resident_memory.py MODEL.gguf

Prints VmRSS, RssAnon (private: KV cache, tables, packed weights) and RssFile (pages of mapped files: the
GGUF weights read in place, shared libraries) in MiB after `import torch`, after loading and after
compiling with the default EngineConfig.
"""

from __future__ import annotations

import argparse
import time

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load


def resident_mib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .gguf file, an HF folder or a registered model's name")
    model = p.parse_args().model
    base = resident_mib()
    loaded = load(model)
    after_load = resident_mib()
    start = time.perf_counter()
    engine = Engine.from_model(config=EngineConfig(), loaded=loaded)
    report = engine.plan.report
    print(
        f"{loaded.path.name}: weights={report.weights} weight bytes per token={report.weight_bytes / 1e6:.0f} MB, "
        f"file={loaded.file_bytes / 1e6:.0f} MB, KV cache={report.kv_cache_bytes / 1e6:.0f} MB, "
        f"compile {time.perf_counter() - start:.1f} s"
    )
    print(f"  MiB after import torch {base}, after load {after_load}, after compile {resident_mib()}")


if __name__ == "__main__":
    main()

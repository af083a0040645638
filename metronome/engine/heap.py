"""The garbage collector in a process that hosts an engine for long: what start-up made (modules, the model,
the tokenizer, the plan) is set aside once, so that a full collection scans only what requests made since.

CPython's cyclic collector runs a full collection now and then as objects accumulate, holding the GIL for as
long as it takes to scan every tracked object. After `metronome serve` loaded SmolLM2 its process tracked
about 217,000 objects, and a full collection took 59-94 ms; one came during the load bench's served levels
(`metronome bench --load`, with a logging `gc.callbacks` hook), and for its length the engine thread could
not start its next step: every stream's next token waited. `gc.freeze()` (Python 3.7+, the remedy CPython's
documentation gives for this) moves the objects alive now into a generation the collector never scans.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then exempt every object alive from later collections. Returns how many objects were
    set aside. Call it once start-up is done (an engine built, a server's model attached): objects made
    before it that later become cyclic garbage are never freed, so not before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

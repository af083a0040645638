"""The block formats of the fused CPU decoder's matmuls (csrc/blocks.h): the kind codes passed to
`block_linear` and `Decoder.add_layer`, and their sizes.

The C++ extension exports the same values (BLOCK_KINDS, BLOCK_BYTES, BLOCK_WEIGHTS); this is the one
Python copy, for code that runs without the extension (packing weights, the torch path). `check_exports`
compares the two: build.load_module runs it on every load, and tests/kernels/test_kernels.py checks it.
"""

from __future__ import annotations

from types import ModuleType

__all__ = [
    "BLOCK_BYTES",
    "BLOCK_GROUPS",
    "BLOCK_KINDS",
    "BLOCK_WEIGHTS",
    "FILE_KINDS",
    "PACKED_KINDS",
    "Q8_0_BYTES",
    "Q8_0_KIND",
    "check_exports",
]

Q8_0_KIND = 0  # Q8_0 rows (N, K/32*34) against float32 x: matrices quantized here from dense weights
# The file's own formats, read as stored (rows of GGUF blocks) against int8-quantized x, and repacked.
BLOCK_KINDS = {
    "Q8_0": Q8_0_KIND,
    "Q4_1X16": 1,  # Q4_0 (as Q4_1 with m = -8d) or Q4_1, repacked 16 rows side by side (below)
    "Q8_0_X8": 2,
    "Q5_0": 3,
    "Q5_1": 4,
    "Q4_K": 5,
    "Q5_K": 6,
    "Q6_K": 7,
    # GGUF blocks repacked 16 rows side by side (csrc/pack.cpp, compile/quant.py pack_16_rows):
    # (ceil(N/16), K/weights*bytes)
    "Q5_0X16": 8,
    "Q4_KX16": 9,
    "Q6_KX16": 10,
    "Q8_0X16": 11,
}
BLOCK_WEIGHTS = {name: 256 if "_K" in name else 32 for name in BLOCK_KINDS}  # per block along K
BLOCK_GROUPS = {name: 16 if name.endswith("X16") else 1 for name in BLOCK_KINDS}
Q8_0_BYTES = 34  # per row and block: fp16 scale + 32 int8
BLOCK_BYTES = {  # per block and group of BLOCK_GROUPS rows
    "Q8_0": Q8_0_BYTES,
    "Q4_1X16": 320,  # 16 fp16 d, 16 fp16 m, 4 x 64 nibble bytes
    "Q8_0_X8": 34,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
    "Q5_0X16": 352,  # 16 fp16 d, 64 bytes of fifth-bit planes, 4 x 64 nibble bytes
    "Q4_KX16": 2368,  # 16 fp16 d, 16 fp16 dmin, 8 x 16 scales, 4 x 32 minimums, 32 x 64 nibble bytes
    "Q6_KX16": 3360,  # 16 fp16 d, 16 x 16 scales, 8 x (4 x 64 nibble bytes, 2 x 64 top-bit bytes)
    "Q8_0X16": 544,  # 16 fp16 d, 8 x 64 code bytes (q + 128)
}
# GGUF tensor type -> the kind the plans repack it into, 16 rows side by side (compile/quant.py
# pack_16_rows; fleet/calibrate.py costs the same choice).
PACKED_KINDS = {qtype: qtype + "X16" for qtype in ("Q5_0", "Q4_K", "Q6_K", "Q8_0")}
# Q4_0 and Q4_1 are repacked the same way, but only where the plan keeps 4-bit weights ("int4" mode).
Q4_PACKED_KIND = "Q4_1X16"
# GGUF tensor type -> the kind that reads its blocks in place.
FILE_KINDS = {
    qtype: BLOCK_KINDS["Q8_0_X8" if qtype == "Q8_0" else qtype]
    for qtype in ("Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
}


def check_exports(module: ModuleType) -> None:
    """Raise ValueError unless the extension's exported block formats equal this module's."""
    exported = {
        "BLOCK_KINDS": dict(module.BLOCK_KINDS),
        "BLOCK_BYTES": dict(module.BLOCK_BYTES),
        "BLOCK_WEIGHTS": dict(module.BLOCK_WEIGHTS),
        "BLOCK_GROUPS": dict(module.BLOCK_GROUPS),
    }
    here = {
        "BLOCK_KINDS": BLOCK_KINDS,
        "BLOCK_BYTES": BLOCK_BYTES,
        "BLOCK_WEIGHTS": BLOCK_WEIGHTS,
        "BLOCK_GROUPS": BLOCK_GROUPS,
    }
    if exported != here:
        raise ValueError(f"the C++ kernels' block formats {exported} differ from metronome/kernels/blocks.py's {here}")

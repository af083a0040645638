"""Hardware catalog: one TOML file per chip in `catalog/`, every number cited in a comment there."""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

CATALOG_DIR = Path(__file__).parent / "catalog"
HOURS_PER_YEAR = 8766.0  # 365.25 days
_NON_HARDWARE = ("calibration.toml", "published.toml")


class HardwareKind(enum.Enum):
    LPU = "lpu"  # SRAM-only, statically scheduled (compiled by lpu.py)
    GPU = "gpu"  # HBM + roofline (gpu.py)
    CPU = "cpu"  # this machine, measured at run time (machine.py); costed like a GPU


@dataclass(frozen=True)
class Hardware:
    """One accelerator chip. Units: bytes, bytes/s, FLOP/s, seconds, watts, US dollars."""

    name: str
    kind: HardwareKind
    description: str
    memory_bytes: float
    memory_bandwidth: float
    flops_fp16: float
    flops_int8: float
    flops_fp8: float
    clock_hz: float
    links: int
    link_bandwidth: float  # per link, each direction
    link_latency_s: float
    node_size: int  # chips per all-to-all connected node (LPU) or NVLink domain (GPU)
    max_chips: int
    power_w: float
    price_per_chip_usd: float
    compute_dtype: str  # "fp16" or "fp8": which flops figure matmuls run at
    default_weight_bits: int
    op_latency_s: float = 0.0  # LPU only: fixed latency of one dependent on-chip op
    price_per_hour_usd: float | None = None  # None: amortize price_per_chip_usd (see hourly_price)

    @property
    def matmul_flops(self) -> float:
        return self.flops_fp8 if self.compute_dtype == "fp8" else self.flops_fp16


@dataclass(frozen=True)
class CostModel:
    """How a chip's purchase price turns into an hourly price."""

    amortization_years: float
    electricity_usd_per_kwh: float


def hourly_price(hw: Hardware, cost: CostModel) -> float:
    """US dollars per chip-hour: the override if set, else purchase price amortized plus electricity at max power."""
    if hw.price_per_hour_usd is not None:
        return hw.price_per_hour_usd
    capex = hw.price_per_chip_usd / (cost.amortization_years * HOURS_PER_YEAR)
    return capex + hw.power_w / 1000.0 * cost.electricity_usd_per_kwh


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"catalog file {path} is not valid TOML ({e}); fix the file") from e


def _hardware_from_dict(data: dict, path: Path) -> Hardware:
    fields = {f.name for f in dataclasses.fields(Hardware)}
    flat = {k: v for k, v in data.items() if k != "lpu"}
    flat.update(data.get("lpu", {}))
    unknown = sorted(set(flat) - fields)
    if unknown:
        raise ValueError(f"catalog file {path}: unknown keys {unknown}; allowed: {sorted(fields)}")
    try:
        flat["kind"] = HardwareKind(flat["kind"])
        return Hardware(**flat)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"catalog file {path}: {e}; every key of tsp-v1.toml is required") from e


def load_hardware(directory: Path = CATALOG_DIR) -> dict[str, Hardware]:
    """All hardware files in `directory`, by name."""
    out: dict[str, Hardware] = {}
    for path in sorted(directory.glob("*.toml")):
        if path.name in _NON_HARDWARE:
            continue
        hw = _hardware_from_dict(_read_toml(path), path)
        out[hw.name] = hw
    if not out:
        raise ValueError(f"no hardware files (*.toml) in {directory}")
    return out


def load_calibration(directory: Path = CATALOG_DIR) -> dict:
    """The raw calibration table (measured runs and cost assumptions)."""
    return _read_toml(directory / "calibration.toml")


def load_cost_model(directory: Path = CATALOG_DIR) -> CostModel:
    c = load_calibration(directory)["cost"]
    return CostModel(amortization_years=c["amortization_years"], electricity_usd_per_kwh=c["electricity_usd_per_kwh"])


def load_published(directory: Path = CATALOG_DIR) -> dict[str, list[dict]]:
    """Published speeds to validate against, by table: "lpu", "speculative", "gpu" (see published.toml)."""
    return _read_toml(directory / "published.toml")


def with_prices(
    hardware: dict[str, Hardware], per_hour: dict[str, float], per_chip: dict[str, float]
) -> dict[str, Hardware]:
    """A copy of `hardware` with price overrides applied (names must exist). A purchase price replaces an
    hourly one the entry had (the measured machine's, a catalog's cloud price): it was silently kept."""
    for flag, table in (("--price-per-hour", per_hour), ("--price-per-chip", per_chip)):
        for name, price in table.items():
            if name not in hardware:
                raise ValueError(f"{flag} {name}={price}: no hardware named {name!r}; known: {sorted(hardware)}")
            if not (math.isfinite(price) and price >= 0):
                raise ValueError(f"{flag} {name}={price}: a price must be a number >= 0")
    both = sorted(set(per_hour) & set(per_chip))
    if both:
        raise ValueError(f"{both[0]} has both --price-per-hour and --price-per-chip: give one price for it")
    out = dict(hardware)
    for name, price in per_chip.items():  # a purchase price is what prices it now, over any hourly one it had
        out[name] = dataclasses.replace(out[name], price_per_chip_usd=price, price_per_hour_usd=None)
    for name, price in per_hour.items():
        out[name] = dataclasses.replace(out[name], price_per_hour_usd=price)
    return out

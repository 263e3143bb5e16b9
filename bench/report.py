"""Rows, the one table, and the JSON lines."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Row:
    """One comparison: ours and HF's figure for the same work, their peak memory, and what else was learnt.

    `unit` says what `ours` / `hf` count (tok/s, tokens, loss, ...); `ratio` is ours / HF, where higher is better
    for every unit but loss (where the note carries the agreement instead).
    """

    work: str
    shape: str
    setting: str
    unit: str
    ours: float | None = None
    hf: float | None = None
    ours_mem_gib: float | None = None
    hf_mem_gib: float | None = None
    mem: str = ""  # what the memory columns measure
    timing: str = ""  # how the speed columns were taken
    note: str = ""
    errors: dict[str, str] = field(default_factory=dict)  # "ours" / "hf" / "row" -> the exception, shortened
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.unit == "loss" or self.ours is None or not self.hf:
            return None
        return self.ours / self.hf

    @property
    def mem_ratio(self) -> float | None:
        return None if self.ours_mem_gib is None or not self.hf_mem_gib else self.ours_mem_gib / self.hf_mem_gib

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": _round(self.ratio, 3),
                "mem_ratio": _round(self.mem_ratio, 3)}


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def fmt(x: float | None, unit: str = "") -> str:
    if x is None or math.isnan(x):
        return "-"
    if unit == "loss":
        return f"{x:.4f}"
    if unit == "tokens":
        return f"{x:,.0f}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


HEADER = ("work", "shape", "setting", "ours", "HF + PEFT", "ratio", "ours peak GiB", "HF peak GiB", "mem ratio",
          "note")


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in rows:
        ours = "error" if "ours" in r.errors else fmt(r.ours, r.unit)
        hf = "error" if "hf" in r.errors else fmt(r.hf, r.unit)
        unit = f" {r.unit}" if r.unit not in ("", "loss") else ""
        note = "; ".join([r.note] * bool(r.note) + [f"{k} error: {v}" for k, v in r.errors.items()])
        out.append((r.work, r.shape, r.setting, ours + unit * (ours not in ("-", "error")),
                    hf + unit * (hf not in ("-", "error")),
                    "-" if r.ratio is None else f"{r.ratio:.2f}x", fmt2(r.ours_mem_gib), fmt2(r.hf_mem_gib),
                    "-" if r.mem_ratio is None else f"{r.mem_ratio:.2f}x", note))
    return out


def fmt2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(rows: list[Row], out: TextIO) -> None:
    """A Markdown table (it goes into RESULTS.md as printed), then what the speed and memory columns measure."""
    lines = [HEADER, *table_rows(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def render(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    print(render(HEADER), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for line in lines[1:]:
        print(render(line), file=out)
    print(file=out)
    for what, attr in (("speed", "timing"), ("peak memory", "mem")):
        kinds = sorted({getattr(r, attr) for r in rows if getattr(r, attr)})
        if kinds:
            print(f"{what}: {'; '.join(kinds)}", file=out)


def write_json(path: str, env: dict[str, Any], rows: list[Row]) -> None:
    with open(path, "w") as f:
        for obj in [env, *(r.to_json() for r in rows)]:
            f.write(json.dumps(obj) + "\n")

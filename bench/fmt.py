"""Number formatting and plain-text tables for the suite's printed report."""

from __future__ import annotations

from typing import Any


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_rows(header: list[str], rows: list[list[Any]]) -> None:
    """A header, a rule, then the rows; the first column left-aligned, the others right."""
    cells = [header] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        padded = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  " + "  ".join(padded))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))

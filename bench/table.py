"""The benchmarks' one table format: fixed-width columns, a dashed rule under the header."""

from __future__ import annotations


def _fmt(v, spec: str = "") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def print_table(headers: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))

"""Cutting test input into the pieces a network might deliver."""

from __future__ import annotations

from itertools import pairwise


def split_at(data: bytes, *points: int) -> list[bytes]:
    """`data` cut at `points` (any order, clamped to its length), without empty pieces:
    an empty piece would mean end of file to receive_data()."""
    edges = [0, *sorted(min(max(p, 0), len(data)) for p in points), len(data)]
    return [data[a:b] for a, b in pairwise(edges) if b > a]

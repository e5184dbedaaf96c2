"""Raw frames gathered into blocks of rows, in raw ``seq_num`` order, ready for the model."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..quality import FLAG_DTYPE, Flag

__all__ = ["RowBlock", "StreamJoin", "seq_ranges"]


@dataclass
class RowBlock:
    """Consecutive raw frames with everything their derived rows carry.

    ``frames`` is (n, H, W) counts, or None when they could not be read (the rows are then
    flagged INVALID). ``positions`` maps a raw position key to its (n,) values (NaN if missing).
    ``flags`` (n,) FLAG_DTYPE: what is already known to be wrong with each row.
    """

    seq_nums: np.ndarray
    times: np.ndarray
    frames: np.ndarray | None
    positions: dict[str, np.ndarray]
    #: time.monotonic() when the raw documents reached the callback, for latency.
    received: float
    # No default: it was None under an ndarray annotation; every caller knows its rows' flags.
    flags: np.ndarray

    def __post_init__(self) -> None:
        if self.frames is None:
            self.flags = self.flags | FLAG_DTYPE(Flag.INVALID)

    def __len__(self) -> int:
        return len(self.seq_nums)


@dataclass
class _ImageChunk:
    seq_start: int
    frames: np.ndarray | None
    n: int
    time: float
    received: float


class StreamJoin:
    """Joins StreamDatum chunks of the frame key and the position keys by raw seq_num.

    ophyd-async emits one StreamDatum per data key for the same seq_num range; a block of rows
    is released once every position key has covered its range (or when forced, at stop/flush,
    with NaN for positions that never came).
    """

    def __init__(self, position_keys: list[str]) -> None:
        self.position_keys = list(position_keys)
        self._images: deque[_ImageChunk] = deque()
        self._positions: dict[str, dict[int, float]] = {k: {} for k in self.position_keys}

    def add_frames(
        self, seq_start: int, frames: np.ndarray | None, n: int, time: float, received: float
    ) -> None:
        self._images.append(_ImageChunk(seq_start, frames, n, time, received))

    def add_positions(self, key: str, seq_start: int, values: np.ndarray) -> None:
        store = self._positions.get(key)
        if store is None:
            return
        flat = np.asarray(values, dtype=np.float64).reshape(len(values), -1)[:, 0]
        store.update(zip(range(seq_start, seq_start + len(flat)), flat.tolist(), strict=True))

    def _covered(self, chunk: _ImageChunk) -> bool:
        last = chunk.seq_start + chunk.n - 1
        return all(chunk.seq_start in s and last in s for s in self._positions.values())

    def pop_ready(self, *, force: bool = False) -> list[RowBlock]:
        blocks = []
        while self._images and (force or self._covered(self._images[0])):
            chunk = self._images.popleft()
            seqs = np.arange(chunk.seq_start, chunk.seq_start + chunk.n, dtype=np.int64)
            positions = {
                key: np.array([store.pop(s, np.nan) for s in seqs.tolist()], dtype=np.float64)
                for key, store in self._positions.items()
            }
            blocks.append(
                RowBlock(
                    seqs,
                    np.full(chunk.n, chunk.time),
                    chunk.frames,
                    positions,
                    chunk.received,
                    np.zeros(chunk.n, dtype=FLAG_DTYPE),
                )
            )
        return blocks


def seq_ranges(rows: Iterable[int | np.integer]) -> str:
    """'3, 7..9' for raw seq_nums [3, 7, 8, 9] (sorted)."""
    parts: list[list[int]] = []
    for row in sorted(int(r) for r in rows):
        if parts and row == parts[-1][1] + 1:
            parts[-1][1] = row
        else:
            parts.append([row, row])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in parts)

"""Rows that a loader drops (no text, no label), counted per file: one warning line with the count and
the first row numbers, and a user error when every row, or more than the allowed share, is dropped.
A CSV whose text column holds stray carriage returns splits rows in two, and the halves have no
label: that must never pass silently."""
from __future__ import annotations

import logging

from fedpft_dist.errors import UserError
from fedpft_dist.runtime import ONCE

log = logging.getLogger(__name__)
FIRST_ROWS_SHOWN = 5
DEFAULT_MAX_FRACTION = 0.01


class DroppedRows:
    """Rows of one input (``where``, e.g. "labelled data file 'x.csv'") as a loader reads them.

    Rows are numbered from 1, the first data row (a header is not a row)."""

    def __init__(self, where: str, key: str = "data.max_dropped_fraction"):
        self.where, self.key = where, key
        self.total = 0
        self.by_reason: dict[str, list[int]] = {}

    def seen(self) -> int:
        """Count one more row; returns its number."""
        self.total += 1
        return self.total

    def drop(self, row: int, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(row)

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.by_reason.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{len(rows):,} {reason}" for reason, rows in self.by_reason.items())
        first = sorted(r for rows in self.by_reason.values() for r in rows)[:FIRST_ROWS_SHOWN]
        more = ", ..." if self.count > len(first) else ""
        return (f"{self.where}: dropped {self.count:,} of {self.total:,} rows ({reasons}); "
                f"rows {', '.join(map(str, first))}{more}")

    def check(self, max_fraction: float = DEFAULT_MAX_FRACTION) -> None:
        """Warn about the dropped rows (rank 0 only), or raise a :class:`UserError` when all of them, or
        more than ``max_fraction`` of them, were dropped."""
        if not self.count:
            return
        if self.count == self.total:
            raise UserError(f"{self.summary()}: no row is left")
        if self.count > max_fraction * self.total:
            raise UserError(f"{self.summary()}: more than {self.key} = {max_fraction:g} of the rows "
                            f"(fix the file, or raise {self.key})")
        log.warning(self.summary(), extra={ONCE: True})

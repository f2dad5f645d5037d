"""A memory budget shared by concurrent work whose size grows with the image.

A click's decoder work is small and fixed, but its answer is made at the image's full size:
on a 6300x6300 upload one click holds a few hundred MB for a second, and twelve at once held
7.9 GB. Each such piece of work reserves its estimated bytes here first; when the budget is
spent it waits for others to finish, so the peak is the budget (plus one piece that alone is
larger than the whole budget, which runs alone), not the number of clients. Small images
never wait: many of their pieces fit at once. Torch-free.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class BudgetTimeout(TimeoutError):
    """The work waited longer than it may for memory held by other work."""


class MemoryBudget:
    """At most ``limit_bytes`` reserved at once; ``reserve`` blocks until its share is free."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"a memory budget must be positive, got {limit_bytes} bytes")
        self.limit_bytes = int(limit_bytes)
        self._reserved = 0
        self._changed = threading.Condition()

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @contextlib.contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        """Hold ``nbytes`` (capped at the limit: a larger piece runs alone) while the block
        runs; ``BudgetTimeout`` after ``timeout`` seconds of waiting."""
        share = max(0, min(int(nbytes), self.limit_bytes))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._reserved + share > self.limit_bytes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BudgetTimeout(
                        f"waited {timeout:g} s for {share} bytes of the {self.limit_bytes}-byte "
                        "budget held by other work"
                    )
                self._changed.wait(left)
            self._reserved += share
        try:
            yield
        finally:
            with self._changed:
                self._reserved -= share
                self._changed.notify_all()

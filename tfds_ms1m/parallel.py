"""An ordered `map` on threads with a bounded number of items in flight (memory stays flat)."""
from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterable, Iterator

_IN_FLIGHT_PER_WORKER = 16


def ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(function, items)` on `workers` threads, in order, with a bounded number of items in flight."""
    if workers <= 1:
        yield from map(function, items)
        return
    window = workers * _IN_FLIGHT_PER_WORKER
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

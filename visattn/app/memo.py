"""A least-recently-used memo bounded by bytes, shared by the threads of one server: the
dashboard keeps each analysed image's trace in it (a ViT-B/16 trace holds about 56 MB, a
CIFAR model's a few hundred kB, so a count of entries bounds nothing)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


class ByteLRU:
    """``get(key, compute, size)``: the value kept under ``key``, else ``compute()`` kept as
    long as the values kept add up to at most ``budget`` bytes (``size(value)`` each), the
    least recently used going first. A value larger than the whole budget is returned, not kept.

    >>> memo = ByteLRU(budget=10)
    >>> memo.get("a", lambda: "x" * 6, len), memo.get("b", lambda: "y" * 6, len)
    ('xxxxxx', 'yyyyyy')
    >>> list(memo.keys()), memo.used
    (['b'], 6)
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self.used = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self) -> list[Hashable]:
        """Keys kept, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, key: Hashable, compute: Callable[[], Any], size: Callable[[Any], int]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = compute()  # outside the lock: other sessions' hits are not held up
        n = int(size(value))
        with self._lock:
            if key in self._items or n > self.budget:
                return value
            while self._items and self.used + n > self.budget:
                _, (_, freed) = self._items.popitem(last=False)
                self.used -= freed
            self._items[key] = (value, n)
            self.used += n
        return value

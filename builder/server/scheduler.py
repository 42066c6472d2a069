"""Who builds next: a queue per tenant, served round-robin, so one tenant's pile of builds does
not keep another tenant's only build waiting behind it (pure)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class _Queued(Protocol):
    @property
    def tenant(self) -> str: ...


T = TypeVar("T", bound=_Queued)


class FairQueue(Generic[T]):
    """FIFO within a tenant; between tenants, one build each in turn."""

    def __init__(self) -> None:
        # Tenants with waiting builds, in the order their turns come.
        self._turns: collections.OrderedDict[str, collections.deque[T]] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._turns.values())

    def __bool__(self) -> bool:
        return bool(self._turns)

    def __contains__(self, item: object) -> bool:
        return any(item in waiting for waiting in self._turns.values())

    def count(self, tenant: str) -> int:
        return len(self._turns.get(tenant, ()))

    def append(self, item: T) -> None:
        self._turns.setdefault(item.tenant, collections.deque()).append(item)

    def remove(self, item: T) -> None:
        waiting = self._turns[item.tenant]
        waiting.remove(item)
        if not waiting:
            del self._turns[item.tenant]

    def popleft(self) -> T:
        """The next build: the front of the tenant whose turn it is; that tenant goes last."""
        tenant, waiting = next(iter(self._turns.items()))
        item = waiting.popleft()
        if waiting:
            self._turns.move_to_end(tenant)
        else:
            del self._turns[tenant]
        return item

    def __iter__(self) -> Iterator[T]:
        """Every waiting build in the order it will start (if nothing else arrives)."""
        queues = [iter(waiting) for waiting in self._turns.values()]
        while queues:
            still = []
            for queue in queues:
                if (item := next(queue, None)) is not None:
                    yield item
                    still.append(queue)
            queues = still

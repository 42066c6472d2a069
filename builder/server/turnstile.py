"""A turnstile: lets waiters through a group per turn of the event loop.

Thousands of log followers woken in one turn of the loop would hold it (and every other request,
and a build's own reading) for as long as all their writes take; let through a group at a time,
they leave the loop free to poll its sockets between groups. (Writes are not turned the same
way: a turn per batch written halved a 1,000-follower burst's throughput.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

GROUP = 64


class Turnstile:
    def __init__(self, group: int = GROUP) -> None:
        self._group = group
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._passing: collections.deque[asyncio.Future[None]] = collections.deque()

    async def wait(self) -> None:
        """Return once a `let_through` after this call lets this waiter through."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # A waiter gone (its client hung up) leaves nothing behind.
            for queue in (self._waiting, self._passing):
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            raise

    def let_through(self) -> None:
        """Everyone waiting now passes, a group per turn; who waits after this waits for the next call."""
        idle = not self._passing
        self._passing.extend(self._waiting)
        self._waiting.clear()
        if idle and self._passing:
            asyncio.get_running_loop().call_soon(self._pass_group)

    def _pass_group(self) -> None:
        for _ in range(min(self._group, len(self._passing))):
            waiter = self._passing.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._passing:
            asyncio.get_running_loop().call_soon(self._pass_group)

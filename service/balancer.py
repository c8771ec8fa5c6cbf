"""Worker processes that share one listening socket take turns: connections spread evenly.

With one listening socket per worker in a ``SO_REUSEPORT`` group the kernel picks a worker by a
hash of each connection's addresses, so 64 streams split 28/36 or 26/38, and the burst lasts as
long as the busier worker takes: a fifth of the other worker's time went idle (docs/scaling.md).
With one shared socket and every worker accepting, whichever wakes first takes the connection
(20/44 measured). Here the workers share one socket, and each accepts only while it has no more
open connections than the least loaded of the others; the counts are in a small file every worker
maps (`LoadTable`), written at each accept and each closed connection.

A worker that is stopped, wedged or gone must not hold the others back: each one's count carries
a heartbeat written four times a second, and a count whose heartbeat is over a second old is left
out. A worker past its share looks again every 2 ms, and at once when one of its own closes.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("chargen.balancer")

SLOT = struct.Struct("qq")  # per worker: open connections (-1: no worker), heartbeat (ms, CLOCK_MONOTONIC)
STALE_S = 1.0  # a worker whose heartbeat is older than this is left out of the comparison
HEARTBEAT_S = 0.25  # how often a worker rewrites its count when nothing changed
RECHECK_S = 0.002  # how often a worker past its share looks again


def now_ms() -> int:
    return int(time.monotonic() * 1000)  # CLOCK_MONOTONIC: the same clock in every process


class LoadTable:
    """Each worker's open connections, in a file of ``slots`` fixed-size records."""

    def __init__(self, path: Path) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.slots = len(self._map) // SLOT.size

    @staticmethod
    def create(path: Path, slots: int) -> None:
        """A table of ``slots`` empty records (the supervisor's, before it starts the workers)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(SLOT.pack(-1, 0) * slots)
        os.replace(tmp, path)

    def publish(self, slot: int, connections: int) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, connections, now_ms())

    def retire(self, slot: int) -> None:
        """The worker in ``slot`` takes no more connections (stopping, or gone)."""
        SLOT.pack_into(self._map, slot * SLOT.size, -1, 0)

    def read(self, slot: int) -> tuple[int, int]:
        return SLOT.unpack_from(self._map, slot * SLOT.size)  # type: ignore[return-value]

    def least_of_others(self, slot: int) -> int | None:
        """The fewest open connections of a live worker other than ``slot`` (None: no other is live)."""
        fresh = now_ms() - STALE_S * 1000
        counts = [c for s in range(self.slots) if s != slot for c, beat in [self.read(s)] if c >= 0 and beat >= fresh]
        return min(counts, default=None)

    def close(self) -> None:
        self._map.close()


class CountedConnections(set[Any]):
    """uvicorn's set of a worker's open connections, calling ``changed`` when one opens or closes."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self.changed = changed

    def add(self, connection: Any) -> None:
        super().add(connection)
        self.changed()

    def discard(self, connection: Any) -> None:
        if connection in self:
            super().discard(connection)
            self.changed()


class Acceptor:
    """Accepts on the shared socket for this worker's event loop while it is this worker's turn."""

    def __init__(
        self,
        sock: socket.socket,
        table: LoadTable,
        slot: int,
        protocol_factory: Callable[[], asyncio.Protocol],
        connections: set[Any],
        counted: Callable[[int], None] | None = None,
    ) -> None:
        self.sock = sock
        self.table = table
        self.slot = slot
        self.protocol_factory = protocol_factory
        self.connections = connections  # uvicorn's: made once a connection's protocol starts
        self.counted = counted  # told each new count (the worker's connections gauge)
        self.pending = 0  # accepted, protocol not started yet
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reading = False
        self.stopped = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open(self) -> int:
        return len(self.connections) + self.pending

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.publish()
        self._heartbeat()
        self._resume()

    def stop(self) -> None:
        """No more accepting here; the others stop counting this worker."""
        self.stopped = True
        if self.loop is not None and self.reading:
            self.loop.remove_reader(self.sock.fileno())
        self.reading = False
        self.table.retire(self.slot)

    def publish(self) -> None:
        if not self.stopped:
            self.table.publish(self.slot, self.open)
        if self.counted is not None:
            self.counted(self.open)

    def changed(self) -> None:
        """A connection of this worker opened or closed."""
        self.publish()
        if not self.reading and not self.stopped and self.my_turn():
            self._resume()

    def my_turn(self) -> bool:
        least = self.table.least_of_others(self.slot)
        return least is None or self.open <= least

    def _readable(self) -> None:
        while self.my_turn():
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):  # another worker took it
                return
            except OSError as err:  # out of file descriptors, say: the others may have some
                log.warning("accept failed: %s", err)
                break
            conn.setblocking(False)
            self.pending += 1
            self.publish()
            task = asyncio.get_running_loop().create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._pause()

    async def _connect(self, conn: socket.socket) -> None:
        assert self.loop is not None
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception:
            log.exception("could not start a connection")
            conn.close()
        finally:
            self.pending -= 1
            self.publish()

    def _pause(self) -> None:
        if self.reading and self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False
        if self.loop is not None and not self.stopped:
            self.loop.call_later(RECHECK_S, self._resume)

    def _resume(self) -> None:
        if not self.reading and not self.stopped and self.loop is not None:
            self.loop.add_reader(self.sock.fileno(), self._readable)
            self.reading = True

    def _heartbeat(self) -> None:
        if not self.stopped and self.loop is not None:
            self.publish()
            self.loop.call_later(HEARTBEAT_S, self._heartbeat)

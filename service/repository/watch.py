"""Watching the models directory: filesystem events (watchfiles), with a periodic rescan.

watchfiles (inotify on Linux) wakes the registry within its debounce of a change; the rescan
every ``poll_s`` also catches what events miss (network filesystems, volumes changed from another
host). Without watchfiles, or if it cannot watch the directory, polling alone does the job.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from service.repository.registry import ModelRegistry

log = logging.getLogger("chargen.service")

DEBOUNCE_MS = 200  # events within this long of each other are one change (a copy, then a rename)


async def watch_models(registry: ModelRegistry, directories: list[Path], poll_s: float) -> None:
    """Reconcile the registry with the directories on every change, until cancelled."""
    shown = ":".join(map(str, directories))
    try:
        from watchfiles import awatch
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        log.info("watchfiles is not installed: polling %s every %.1f s", shown, poll_s)
        await poll_models(registry, poll_s)
        return
    try:
        async for _changes in awatch(
            *directories,
            debounce=DEBOUNCE_MS,
            step=50,
            rust_timeout=int(poll_s * 1000),
            yield_on_timeout=True,  # an empty set every poll_s: the periodic rescan
            recursive=False,
        ):
            await registry.reconcile()
    except asyncio.CancelledError:
        raise
    except Exception as err:  # cannot watch (inotify limits, the directory went away): poll instead
        log.warning("cannot watch %s (%s): polling every %.1f s", shown, err, poll_s)
        await poll_models(registry, poll_s)


async def poll_models(registry: ModelRegistry, poll_s: float) -> None:
    while True:
        await asyncio.sleep(poll_s)
        await registry.reconcile()

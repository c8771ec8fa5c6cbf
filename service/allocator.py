"""tcmalloc for the processes that run the model (``CHARGEN_ALLOCATOR=auto|tcmalloc|system``).

Every engine tick allocates each step's state and keeps it (the snapshots that make rewinds and
saves exact), so the step's buffers keep moving to memory the cache has not seen. Under glibc's
malloc that cost the scripted call about 7 % at 32 rows; with tcmalloc the same service served
x 1.095 the characters at 64 x 500 side by side (docs/benchmarks.md). PyTorch's CPU tuning
guide recommends tcmalloc or jemalloc for the same reason; jemalloc measured no better than
glibc here.

An allocator is chosen when a process starts, so it is preloaded (``LD_PRELOAD``) into the
processes chargen starts itself: each worker of ``--workers N``, and ``chargen serve`` with one
process, which starts itself again with it once. ``auto`` takes tcmalloc where the dynamic
linker finds it (Debian and Ubuntu: ``apt-get install libtcmalloc-minimal4``; the image has it)
and the system's allocator elsewhere; ``tcmalloc`` insists on it.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping
from typing import Literal

log = logging.getLogger("chargen.service")

Allocator = Literal["auto", "tcmalloc", "system"]
LIBRARY_NAME = "tcmalloc_minimal"  # no heap profiler or checker: what serving needs, and nothing else
PRELOADED = "CHARGEN_ALLOCATOR_PRELOADED"  # set in a process started with the preload (no second restart)


class AllocatorMissing(Exception):
    """CHARGEN_ALLOCATOR=tcmalloc where the dynamic linker does not find the library."""


def tcmalloc_library() -> str | None:
    """The library's file name as the dynamic linker finds it (e.g. libtcmalloc_minimal.so.4), or None."""
    return ctypes.util.find_library(LIBRARY_NAME)


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (it is mapped into its memory)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(LIBRARY_NAME in line for line in maps)
    except OSError:  # not Linux
        return False


def preloading(choice: Allocator, env: Mapping[str, str]) -> dict[str, str] | None:
    """``env`` with tcmalloc preloaded, for a process to start; None: start it with ``env`` as it is.

    Raises AllocatorMissing for ``tcmalloc`` where the library is not found."""
    if choice == "system":
        return None
    library = tcmalloc_library()
    if library is None:
        if choice == "tcmalloc":
            message = "CHARGEN_ALLOCATOR=tcmalloc, but the dynamic linker finds no libtcmalloc_minimal"
            raise AllocatorMissing(message + " (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
        return None
    preload = env.get("LD_PRELOAD", "")
    if LIBRARY_NAME in preload:
        return None
    return {**env, "LD_PRELOAD": f"{library} {preload}".strip(), PRELOADED: "1"}


def restart_with_tcmalloc(choice: Allocator) -> None:
    """Start this process again on tcmalloc (``os.execve``: same arguments, same pid) if it should
    run on it and does not; returns when it already does, or should not, or cannot."""
    if tcmalloc_loaded() or os.environ.get(PRELOADED):  # preloaded (or the preload did not take)
        return
    env = preloading(choice, os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """This process's allocator, for the start-up log."""
    return "tcmalloc" if tcmalloc_loaded() else "the system's malloc"

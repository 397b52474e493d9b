"""tcmalloc as the `etpo` process's malloc, where the library is installed (docs/design.md §6).

glibc's malloc hands every block over 32 MiB (a (tokens, vocabulary) fp32 tensor is ~200 MiB) to
mmap and back to the kernel when freed, so each fresh large tensor pays its page faults again;
tcmalloc keeps freed memory for the next allocation. On this project's train stage that was 1.1-1.8x
(bench/RESULTS.md). A process cannot swap its allocator once running: `etpo` re-executes itself once
with the library in LD_PRELOAD, before any heavy import. `ETPO_ALLOCATOR=system` keeps glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # Debian's libtcmalloc-minimal4, gperftools' full one
TRIED = "ETPO_ALLOCATOR_TRIED"  # set on the re-executed process: never loop if the preload failed


def tcmalloc_active() -> bool:
    """Whether tcmalloc serves this process's malloc (its symbols are in the global namespace)."""
    return hasattr(ctypes.CDLL(None), "tc_malloc")


def use_tcmalloc() -> None:
    """Re-execute this process with tcmalloc preloaded, if it is installed and not active yet;
    otherwise return and keep the system allocator (same results, slower)."""
    if sys.platform != "linux" or os.environ.get("ETPO_ALLOCATOR") == "system" or os.environ.get(TRIED):
        return
    if tcmalloc_active():
        return
    library = next(filter(None, map(ctypes.util.find_library, LIBRARIES)), None)
    if library is None:
        return
    env = {
        **os.environ,
        "LD_PRELOAD": " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")])),
        TRIED: "1",
    }
    sys.stdout.flush()  # exec drops unwritten buffers
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

"""`etpo` runs under tcmalloc where it is installed, and keeps the system allocator when asked."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from pipeline.allocator import LIBRARIES, TRIED

REPORT = "from pipeline.allocator import *; use_tcmalloc(); print(tcmalloc_active())"
INSTALLED = any(map(ctypes.util.find_library, LIBRARIES))


def active_in_child(**env: str) -> str:
    """What `tcmalloc_active()` says in a fresh interpreter after `use_tcmalloc()`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ETPO_ALLOCATOR", TRIED)}
    done = subprocess.run(
        [sys.executable, "-c", REPORT], env=clean | env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(
    sys.platform != "linux" or not INSTALLED, reason="tcmalloc is not installed (make setup installs it)"
)
def test_reexecutes_under_tcmalloc() -> None:
    assert active_in_child() == "True"


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_system_allocator_on_request() -> None:
    assert active_in_child(ETPO_ALLOCATOR="system") == "False"


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_no_second_try() -> None:
    """A process that was re-executed once (the preload failed, say) does not try again: no loop."""
    assert active_in_child(**{TRIED: "1"}) == "False"

"""Host side of execution: a warm pool of sandboxed workers, a result cache, and `run_many`.

Generated code never runs in this process. Each worker is `harness.py` inside bubblewrap (no
network, read-only system, private /tmp, only its task's data, dies with us) or, where bubblewrap
is missing, a plain subprocess whose forked children are still rlimited (a warned fallback).
A worker has already imported numpy and scikit-learn and loaded its task, so a program costs a
few forks, not a Python start-up and a 1 s scikit-learn import.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import queue
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ExecutorConfig
from pipeline.io import write_json
from pipeline.sandbox import harness
from pipeline.tasks.datasets import load_task

HARNESS_PATH = Path(harness.__file__)
HARNESS_VERSION = hashlib.sha256(HARNESS_PATH.read_bytes()).hexdigest()[:16]
START_TIMEOUT_S = 120.0  # importing scikit-learn on a loaded 2-core machine can be slow
SCORING_GRACE_S = 30.0  # host-side guard on top of the program's own time limit


@dataclass(frozen=True)
class ExecResult:
    status: str
    reward: float
    score_std: float
    seconds: float
    error: str
    cached: bool = False


def failure(status: str, error: str, seconds: float = 0.0) -> ExecResult:
    return ExecResult(status, -1.0, 0.0, seconds, error)


def static_check(source: str) -> ExecResult | None:
    """Syntax and banned constructs, found by parsing only (parsing runs no code)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        return failure("syntax", f"{type(e).__name__}: {e}")
    for node in ast.walk(tree):
        name = (
            node.id
            if isinstance(node, ast.Name)
            else node.attr
            if isinstance(node, ast.Attribute)
            else node.name
            if isinstance(node, ast.alias)
            else None
        )
        if name in harness.BANNED:
            return failure("banned", f"{name} is not allowed: choose the model yourself")
    return None


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


class Worker:
    """One sandboxed harness process serving one task; requests are answered in order."""

    def __init__(self, data_path: Path, use_bwrap: bool, scratch: Path):
        self.scratch = Path(tempfile.mkdtemp(prefix="worker-", dir=scratch))
        os.chmod(self.scratch, 0o711)  # the dropped-privilege child must reach its run dir
        env = {
            "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
            "OMP_NUM_THREADS": "1",  # parallelism comes from the pool, not from BLAS threads
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # machine-specific numpy fixes
            if key in os.environ:
                env[key] = os.environ[key]
        if use_bwrap:
            env.update(ETPO_SANDBOX_PIDNS="1", ETPO_SANDBOX_TMP="/tmp")
            command = _bwrap_command(data_path, env)
            env = None
        else:
            env["ETPO_SANDBOX_TMP"] = str(self.scratch)
            command = [sys.executable, "-I", str(HARNESS_PATH), str(data_path)]
        self.log = self.scratch / "worker.log"  # the harness's own stderr, for diagnosis
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=self.scratch,
                start_new_session=True,
            )
        self._buffer = b""
        reply = self._readline(time.monotonic() + START_TIMEOUT_S)
        if not reply or not json.loads(reply).get("ready"):
            why = self.last_words()
            self.close()
            raise RuntimeError(f"the sandbox worker failed to start{why}")

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def score(self, source: str, limits: dict) -> ExecResult:
        """Send one program; a dead or hung worker becomes an `error` result (and is closed)."""
        started = time.perf_counter()
        try:
            request = json.dumps({"source": source, "limits": limits}) + "\n"
            self.process.stdin.write(request.encode())
            self.process.stdin.flush()
            wall_limit = limits["timeout_s"] * limits["wall_limit_factor"]
            reply = self._readline(time.monotonic() + wall_limit + SCORING_GRACE_S)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            why = self.last_words()
            self.close()
            return failure("error", f"the sandbox worker died{why}", time.perf_counter() - started)
        data = json.loads(reply)
        return ExecResult(
            data["status"], data["reward"], data["score_std"], time.perf_counter() - started, data["error"]
        )

    def last_words(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return f": {lines[-1]}" if lines else ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _bwrap_command(data_path: Path, env: dict[str, str]) -> list[str]:
    """bubblewrap: no network, read-only system and Python, private /tmp, only this task's data."""
    as_root = os.getuid() == 0
    command = [
        "bwrap",
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if not as_root:  # unprivileged bwrap needs a user namespace; as root the child drops to nobody
        command.append("--unshare-user")
    # /tmp first: a later mount inside it (a venv under /tmp, say) must not be covered by it
    command += ["--perms", "1777", "--tmpfs", "/tmp"]
    binds = [p for p in ("/usr", "/lib", "/lib64", "/bin", sys.base_prefix, sys.prefix) if os.path.exists(p)]
    parents = sorted({str(a) for p in binds for a in Path(p).parents if str(a) != "/"})
    for parent in parents:  # traversable, so the unprivileged child can import from below them
        command += ["--perms", "0755", "--dir", parent]
    for path in binds:
        command += ["--ro-bind", path, path]
    command += [
        "--ro-bind",
        str(HARNESS_PATH),
        "/sandbox/harness.py",
        "--ro-bind",
        str(data_path),
        "/task/data.npz",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--chdir",
        "/tmp",
        "--clearenv",
    ]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return command + [sys.executable, "-I", "/sandbox/harness.py", "/task/data.npz"]


class Executor:
    """Score programs on tasks in parallel warm sandboxes, with a persistent result cache.

    Use as a context manager (workers are processes and must be shut down).
    """

    def __init__(self, tasks_dir: str | Path, config: ExecutorConfig, cache_dir: str | Path | None = None):
        self.tasks_dir = Path(tasks_dir)
        self.config = config
        self.workers = config.workers or os.cpu_count() or 1
        self.use_bwrap = config.sandbox == "bwrap" or (config.sandbox == "auto" and bwrap_available())
        if config.sandbox == "bwrap" and not bwrap_available():
            raise RuntimeError("executor.sandbox is 'bwrap' but bubblewrap is not installed")
        if not self.use_bwrap and config.sandbox == "auto":
            warnings.warn(
                "bubblewrap not found: generated code runs with rlimits only "
                "(no network or filesystem isolation); install 'bubblewrap'",
                stacklevel=2,
            )
        self.cache_dir = Path(cache_dir) if (cache_dir and config.cache) else None
        self.scratch = Path(tempfile.mkdtemp(prefix="etpo-exec-"))
        os.chmod(self.scratch, 0o711)
        self._idle: dict[str, queue.SimpleQueue[Worker]] = {}
        self._data: dict[str, tuple[Path, str]] = {}  # task -> (npz path, content hash)
        self._all: list[Worker] = []
        self._lock = threading.Lock()
        # Long-lived threads: bwrap --die-with-parent kills a worker when the *thread* that
        # started it exits, so workers must not be spawned from short-lived pool threads.
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="etpo-exec")

    @property
    def limits(self) -> dict:
        c = self.config
        return {
            "timeout_s": c.timeout_s,
            "wall_limit_factor": c.wall_limit_factor,
            "memory_mb": c.memory_mb,
            "max_processes": c.max_processes,
            "max_output_bytes": c.max_output_bytes,
        }

    def _task_data(self, task: str) -> tuple[Path, str]:
        with self._lock:
            if task not in self._data:
                loaded = load_task(self.tasks_dir, task)
                path = self.scratch / f"{task}.npz"
                np.savez(path, x=loaded.x, y=loaded.y)
                os.chmod(path, 0o644)
                digest = hashlib.sha256(loaded.x.tobytes() + loaded.y.tobytes()).hexdigest()
                self._data[task] = (path, digest)
                self._idle[task] = queue.SimpleQueue()
            return self._data[task]

    def _checkout(self, task: str) -> Worker:
        data_path, _ = self._task_data(task)
        try:
            return self._idle[task].get_nowait()
        except queue.Empty:
            worker = Worker(data_path, self.use_bwrap, self.scratch)
            with self._lock:
                self._all.append(worker)
            return worker

    def cache_key(self, task: str, source: str) -> str:
        _, data_hash = self._task_data(task)
        settings = {
            "source": source,
            "task": task,
            "data": data_hash,
            "limits": self.limits,
            "harness": HARNESS_VERSION,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def run(self, task: str, source: str) -> ExecResult:
        """Score one complete program (template with the body filled in) on one task."""
        return self._pool.submit(self._run, task, source).result()

    def _run(self, task: str, source: str) -> ExecResult:
        found = static_check(source)
        if found:
            return found
        key = self.cache_key(task, source)
        cache_file = self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None
        if cache_file and cache_file.exists():
            return ExecResult(**{**json.loads(cache_file.read_text()), "cached": True})
        worker = self._checkout(task)
        result = worker.score(source, self.limits)
        if worker.alive:
            self._idle[task].put(worker)
        if cache_file and result.status != "timeout":  # a timeout may depend on machine load
            write_json(cache_file, asdict(result))
        return result

    def run_many(
        self, jobs: Sequence[tuple[str, str]], on_done: Callable[[ExecResult], None] | None = None
    ) -> list[ExecResult]:
        """Score (task, source) pairs in parallel; results come back in the order of `jobs`."""

        def one(job: tuple[str, str]) -> ExecResult:
            result = self._run(*job)
            if on_done:
                on_done(result)
            return result

        return list(self._pool.map(one, jobs))

    def close(self) -> None:
        self._pool.shutdown()
        for worker in self._all:
            worker.close()
        self._all.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

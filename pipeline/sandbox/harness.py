"""The warm worker that runs inside the sandbox. Standard library, numpy and scikit-learn only.

It imports numpy and scikit-learn once, loads one task and its splits, then serves requests
(JSON lines on stdin/stdout). Each split of each program runs in its own forked child that:
  - drops to an unprivileged uid (when we are root), sets rlimits (CPU, address space, processes,
    file size), works in a private temp dir, reads /dev/null as stdin;
  - is given that split's x_train, y_train and x_test (the held-out labels stay in the worker);
  - sends back predict_proba(x_test) as raw float64 bytes.
The worker, which never runs generated code, computes ROC-AUC from those probabilities. So a
program cannot fake its reward by patching scikit-learn. A row held out in one split is a
training row of another, so nothing may carry over between splits: each split gets a fresh child
(a module attribute or `builtins` dies with it), and after each split the worker kills every
other process in its pid namespace (bubblewrap mode) or the child's process group (fallback) and
empties the temp dir (in bubblewrap mode the only place a program can write).

Run as: python harness.py DATA.npz     (DATA holds arrays x, y)
"""

import contextlib
import ctypes
import json
import math
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

import numpy as np
import scipy.stats

# The modules generated bodies import: imported once here so a fork finds them warm.
import sklearn.calibration  # noqa: F401
import sklearn.compose  # noqa: F401
import sklearn.decomposition  # noqa: F401
import sklearn.discriminant_analysis  # noqa: F401
import sklearn.ensemble  # noqa: F401
import sklearn.feature_selection  # noqa: F401
import sklearn.gaussian_process  # noqa: F401
import sklearn.impute  # noqa: F401
import sklearn.linear_model  # noqa: F401
import sklearn.model_selection
import sklearn.multiclass  # noqa: F401
import sklearn.naive_bayes  # noqa: F401
import sklearn.neighbors  # noqa: F401
import sklearn.neural_network  # noqa: F401
import sklearn.pipeline  # noqa: F401
import sklearn.preprocessing  # noqa: F401
import sklearn.svm  # noqa: F401
import sklearn.tree  # noqa: F401

N_SPLITS = 5  # shuffled 50/50 splits with seeds 0..4 (docs/design.md §2)
NOBODY = 65534
BANNED = ("GridSearchCV", "RandomizedSearchCV", "HalvingGridSearchCV", "HalvingRandomSearchCV")
MAX_ERROR = 4000
PR_SET_CHILD_SUBREAPER = 36
IN_PID_NAMESPACE = os.environ.get("ETPO_SANDBOX_PIDNS") == "1"


class Failure(Exception):
    """A scored failure: carries the status of docs/design.md §2."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class _Banned:
    def __init__(self, *args, **kwargs):
        raise Failure("banned", f"{type(self).__name__} is not allowed: choose the model yourself")


def splits(y):
    """Train/test index pairs: stratified so every class is on both sides of each split."""
    index = np.arange(len(y))
    return [
        sklearn.model_selection.train_test_split(
            index, test_size=0.5, shuffle=True, random_state=seed, stratify=y
        )
        for seed in range(N_SPLITS)
    ]


def binary_auc(positive, score):
    """ROC-AUC as the Mann-Whitney statistic (ties count 1/2): equal to sklearn's roc_auc_score
    and ~20x faster, which matters when the worker scores every program itself."""
    ranks = scipy.stats.rankdata(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc(y_test, proba, n_classes):
    """ROC-AUC of predicted probabilities: binary on column 1; multiclass one-vs-one, macro
    average over class pairs of the mean of both directions (sklearn's multi_class="ovo")."""
    if n_classes == 2:
        return float(binary_auc(y_test == 1, proba[:, 1]))
    if not np.allclose(proba.sum(axis=1), 1.0):
        raise ValueError("multiclass predict_proba rows must sum to 1")
    pairs = []
    for a in range(n_classes):
        for b in range(a + 1, n_classes):
            mask = (y_test == a) | (y_test == b)
            y_pair, p_pair = y_test[mask], proba[mask]
            pairs.append((binary_auc(y_pair == a, p_pair[:, a]) + binary_auc(y_pair == b, p_pair[:, b])) / 2)
    return float(np.mean(pairs))


def _world_traversable(path):
    """True if every directory down to `path` lets other users in (o+x)."""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


# An unprivileged child must still import modules that the worker has not imported yet.
CAN_DROP = os.getuid() == 0 and all(_world_traversable(p) for p in (sys.base_prefix, sys.prefix))


def _drop_privileges(workdir):
    if CAN_DROP:
        os.chown(workdir, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _set_limits(limits, cpu_left):
    cpu = max(1, math.ceil(cpu_left))
    # SIGXCPU at the soft limit is what reports a timeout; the hard limit, a second later, sends
    # SIGKILL to a program that ignores SIGXCPU. With soft == hard a kernel may send SIGKILL alone
    # (seen on Linux 6.18), which would read as a memory kill.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_output_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    with open("/proc/self/statm") as f:  # address space already mapped by the warm worker
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _fit_and_predict(source, x_train, y_train, x_test, n_classes):
    """Runs generated code (in the child only). Returns predict_proba(x_test) as float64."""
    for name in BANNED:  # also catches getattr tricks that the host's AST check cannot see
        setattr(sklearn.model_selection, name, type(name, (_Banned,), {}))
    namespace = {"__name__": "candidate"}
    try:
        code = compile(source, "<build_model>", "exec")
    except (SyntaxError, ValueError) as e:
        raise Failure("syntax", f"{type(e).__name__}: {e}") from None
    exec(code, namespace)
    build_model = namespace.get("build_model")
    if not callable(build_model):
        raise Failure("error", "the program defines no build_model function")
    model = build_model(x_train.copy(), y_train.copy())
    if model is None:
        raise Failure("error", "build_model returned None")
    if not hasattr(model, "predict_proba"):
        raise Failure("no_proba", f"{type(model).__name__} has no predict_proba")
    proba = np.asarray(model.predict_proba(x_test.copy()), dtype=np.float64)
    if proba.shape != (len(x_test), n_classes):
        raise Failure(
            "error", f"predict_proba returned shape {proba.shape}, expected {(len(x_test), n_classes)}"
        )
    return proba


def _program_traceback():
    """The exception being handled, formatted without the harness's own frames.

    A reflection prompt carries this text, so the harness's line numbers in it would make every
    later prompt (and so every trajectory) change with any edit of this file; what the model
    needs is the program's frames and the library frames it called.
    """
    kind, error, tb = sys.exc_info()
    frames = [frame for frame in traceback.extract_tb(tb) if frame.filename != __file__]
    head = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
    return head + "".join(traceback.format_exception_only(kind, error))


def _child(write_fd, source, folds, limits, cpu_left, n_classes):
    """Entry of the forked child: fit and predict every split; never returns."""
    header, payload = {"status": "error", "error": "unknown"}, b""
    try:
        os.setsid()
        workdir = tempfile.mkdtemp(prefix="run-")
        os.chdir(workdir)
        stdin = os.open(os.devnull, os.O_RDONLY)
        output = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(stdin, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead
        _drop_privileges(workdir)
        _set_limits(limits, cpu_left)
        probas = []
        for fold in folds:
            random.seed(0)  # estimators without random_state still score the same every time
            np.random.seed(0)
            probas.append(_fit_and_predict(source, *fold, n_classes))
        header, payload = {"status": "ok"}, np.concatenate(probas).tobytes()
    except Failure as e:
        header = {"status": e.status, "error": str(e)[-MAX_ERROR:]}
    except MemoryError:
        header = {"status": "memory", "error": "MemoryError: the program exceeded its memory limit"}
    except BaseException:  # generated code may raise anything, SystemExit included
        header = {"status": "error", "error": _program_traceback()[-MAX_ERROR:]}
    try:
        data = json.dumps(header).encode()
        os.write(write_fd, struct.pack("<II", len(data), len(payload)) + data)
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view) :]
    finally:
        os._exit(0)


def _read_message(fd, deadline):
    """Read one length-prefixed message (header, payload); stop at EOF or the deadline.

    Stops as soon as a whole message is in, since a program's own children may hold the pipe
    open. Returns (header dict or None, payload bytes, timed_out).
    """
    raw, need = b"", 8
    while len(raw) < need:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, b"", True
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, min(need - len(raw), 1 << 20))
        if not chunk:
            return None, b"", False
        raw += chunk
        if len(raw) == 8 and need == 8:
            header_len, payload_len = struct.unpack("<II", raw)
            need = 8 + header_len + payload_len
    header_len = struct.unpack("<I", raw[:4])[0]
    return json.loads(raw[8 : 8 + header_len]), raw[8 + header_len :], False


def become_subreaper():
    """Make orphaned descendants our children (Linux prctl PR_SET_CHILD_SUBREAPER).

    A program's processes that outlive their parent then come back to us to be killed and
    reaped, and their CPU seconds count against the program's budget: without this, a body that
    forks and lets its parent exit would compute on a fresh CPU limit, uncounted.
    """
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _our_children():
    """Pids whose parent is this process (orphans included, as we are a subreaper)."""
    me, children = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
            except (OSError, ValueError, IndexError):
                continue
            if parent == me:
                children.append(int(entry))
    return children


def _kill_all(pid):
    """SIGKILL the program: in our own pid namespace every process but init and us; otherwise
    the child's process group and any of our children (a daemonised orphan comes back to us)."""
    if IN_PID_NAMESPACE:
        targets = [(os.kill, -1)]
    else:
        targets = [(os.killpg, pid)] + [(os.kill, child) for child in _our_children()]
    for kill, target in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)


def _reap(pid):
    """Kill the child and everything it started, reap them all; return the child's exit status
    and the CPU seconds of every process reaped (wait4's usage, which includes the processes
    each of them waited for). Repeated until we have no child left: a fork bomb or a daemonised
    grandchild cannot outlive its program.
    """
    status, cpu = None, 0.0
    give_up = time.monotonic() + 5
    while time.monotonic() < give_up:
        _kill_all(pid)
        try:
            while (reaped := os.wait4(-1, os.WNOHANG))[0]:
                cpu += reaped[2].ru_utime + reaped[2].ru_stime
                status = reaped[1] if reaped[0] == pid else status
        except ChildProcessError:
            break
        time.sleep(0.0005)
    if status is None:  # a process that would not die in time (an uninterruptible wait)
        _, status, usage = os.wait4(pid, 0)
        cpu += usage.ru_utime + usage.ru_stime
    return status, cpu


def _run_program(source, folds, limits, n_classes, cpu_left, deadline):
    """Run a program on `folds` in a fresh child, within `cpu_left` CPU seconds and the wall-clock
    `deadline`: (status, error, probabilities or None, CPU seconds used)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, source, folds, limits, cpu_left, n_classes)
    os.close(write_fd)
    header, payload, timed_out = _read_message(read_fd, deadline)
    os.close(read_fd)
    status, cpu = _reap(pid)
    if timed_out:
        wall = limits["timeout_s"] * limits["wall_limit_factor"]
        return "timeout", f"exceeded the wall-clock limit of {wall} s", None, cpu
    if cpu > cpu_left or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU):
        return "timeout", f"exceeded the time limit of {limits['timeout_s']} CPU seconds", None, cpu
    return *_read_result(header, payload, status, folds, n_classes), cpu


def _read_result(header, payload, status, folds, n_classes):
    """What a child that finished in time sent: (status, error, probabilities or None)."""
    if header is None:
        if os.WIFSIGNALED(status):
            kind = "memory" if os.WTERMSIG(status) == signal.SIGKILL else "error"
            return kind, f"killed by signal {os.WTERMSIG(status)}", None
        return "error", f"exited with code {os.WEXITSTATUS(status)} before reporting", None
    if header["status"] != "ok":
        return header["status"], header["error"], None
    n_test = sum(len(fold[2]) for fold in folds)
    proba = np.frombuffer(payload, dtype=np.float64)
    if proba.size != n_test * n_classes:
        return "error", "the program's result was cut short", None
    return "ok", "", proba.reshape(n_test, n_classes)


def clear_scratch(keep):
    """Remove whatever a program left in the temp dir (all but the names in `keep`)."""
    for leftover in set(os.listdir(tempfile.gettempdir())) - keep:
        path = os.path.join(tempfile.gettempdir(), leftover)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _run_splits(source, x, y, limits, split_indices, n_classes, keep):
    """Each split in a fresh child, the temp dir emptied in between; one time limit for all."""
    cpu_left = limits["timeout_s"]
    deadline = time.monotonic() + limits["timeout_s"] * limits["wall_limit_factor"]
    probas = []
    for train, test in split_indices:
        fold = (x[train], y[train], x[test])
        status, error, proba, cpu = _run_program(source, [fold], limits, n_classes, cpu_left, deadline)
        cpu_left -= cpu
        clear_scratch(keep)
        if status != "ok":
            return status, error, None
        probas.append(proba)
    return "ok", "", np.concatenate(probas)


def score(source, x, y, limits, split_indices, keep=frozenset()):
    """The reward of docs/design.md for one program: dict(status, reward, score_std, error)."""
    n_classes = int(y.max()) + 1
    status, error, proba = _run_splits(source, x, y, limits, split_indices, n_classes, keep)
    scores = []
    if status == "ok" and not np.all(np.isfinite(proba)):
        status, error = "error", "predict_proba returned NaN or infinity"
    if status == "ok":
        offsets = np.cumsum([0] + [len(test) for _, test in split_indices])
        try:
            for (_, test), start, stop in zip(split_indices, offsets[:-1], offsets[1:], strict=True):
                scores.append(auc(y[test], proba[start:stop], n_classes))
        except ValueError as e:
            status, error = "error", f"scoring predict_proba failed: {e}"
    if status != "ok":
        return {"status": status, "reward": -1.0, "score_std": 0.0, "error": error}
    return {"status": "ok", "reward": float(np.mean(scores)), "score_std": float(np.std(scores)), "error": ""}


def serve(data_path):
    with np.load(data_path) as data:
        x, y = data["x"], data["y"]
    split_indices = splits(y)
    become_subreaper()
    tempfile.tempdir = os.environ.get("ETPO_SANDBOX_TMP") or tempfile.gettempdir()
    keep = frozenset(os.listdir(tempfile.tempdir))  # the worker's own files (its log, in fallback mode)
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        result = score(request["source"], x, y, request["limits"], split_indices, keep)
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    serve(sys.argv[1])

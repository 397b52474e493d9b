"""The executor scores exactly as docs/design.md §2 and contains hostile programs."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from pipeline.sandbox.executor import HARNESS_PATH, Executor, bwrap_available
from pipeline.tasks.datasets import build_tasks, load_task, save_tasks
from pipeline.tasks.prompts import program, state_source
from tests.conftest import REPO, defaults

LOGISTIC = (
    "    from sklearn.linear_model import LogisticRegression\n"
    "    model = LogisticRegression(max_iter=1000).fit(x_train, y_train)"
)
FOREST = (
    "    from sklearn.ensemble import RandomForestClassifier\n"
    "    model = RandomForestClassifier(n_estimators=20, random_state=0).fit(x_train, y_train)"
)


def source_for(tasks_dir: Path, task: str, body: str) -> str:
    loaded = load_task(tasks_dir, task)
    return program(state_source(loaded.description, loaded.x.shape), body)


def direct_reward(x, y, make_model) -> tuple[float, float]:
    """docs/design.md §2 written out with scikit-learn: 5 shuffled stratified 50/50 splits, seeds 0..4."""
    scores = []
    for seed in range(5):
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=0.5, shuffle=True, random_state=seed, stratify=y
        )
        proba = make_model().fit(x_tr, y_tr).predict_proba(x_te)
        if proba.shape[1] == 2:
            scores.append(roc_auc_score(y_te, proba[:, 1]))
        else:
            scores.append(roc_auc_score(y_te, proba, multi_class="ovo"))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize(
    ("task", "body", "make_model"),
    [
        ("tic-tac-toe", LOGISTIC, lambda: LogisticRegression(max_iter=1000)),
        ("balance-scale", FOREST, lambda: RandomForestClassifier(n_estimators=20, random_state=0)),
        ("iris", LOGISTIC, lambda: LogisticRegression(max_iter=1000)),
    ],
)
def test_reward_equals_direct_sklearn(executor, tasks_dir, task, body, make_model):
    loaded = load_task(tasks_dir, task)
    result = executor.run(task, source_for(tasks_dir, task, body))
    assert result.status == "ok", result.error
    expected_mean, expected_std = direct_reward(loaded.x, loaded.y, make_model)
    assert result.reward == pytest.approx(expected_mean, abs=1e-12)
    assert result.score_std == pytest.approx(expected_std, abs=1e-12)


FAILURES = {
    "syntax": "    model = (",
    "error": "    model = undefined_name",
    "timeout": "    while True:\n        pass",
    "memory": "    hog = bytearray(64 * 2**30)",
    "banned": (
        "    from sklearn.model_selection import GridSearchCV\n"
        "    from sklearn.svm import SVC\n"
        "    model = GridSearchCV(SVC(), {'C': [1]}).fit(x_train, y_train)"
    ),
    "no_proba": ("    from sklearn.svm import LinearSVC\n    model = LinearSVC().fit(x_train, y_train)"),
}


@pytest.mark.parametrize("status", sorted(FAILURES))
def test_each_failure_status_from_a_real_program(executor, tasks_dir, status):
    result = executor.run("iris", source_for(tasks_dir, "iris", FAILURES[status]))
    assert (result.status, result.reward) == (status, -1.0), result.error
    assert result.error
    assert "harness" not in result.error  # its line numbers would tie later prompts to its edits
    if status == "error":
        assert 'File "<build_model>", line' in result.error and "NameError" in result.error, result.error


def test_banned_through_getattr_is_caught_inside_the_sandbox(executor, tasks_dir):
    body = (
        "    import sklearn.model_selection as ms\n    from sklearn.svm import SVC\n"
        "    model = getattr(ms, 'Grid' + 'SearchCV')(SVC(), {'C': [1]}).fit(x_train, y_train)"
    )
    result = executor.run("iris", source_for(tasks_dir, "iris", body))
    assert result.status == "banned"


HOSTILE = {
    "fork_bomb": "    import os\n    while True:\n        os.fork()",
    "huge_output": "    while True:\n        print('x' * 100000)",
    "kill_parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    model = None",
    "os_exit": "    import os\n    os._exit(0)",
    "read_stdin": "    model = input()",
    "network": (
        "    import socket\n    s = socket.socket()\n    s.settimeout(1)\n"
        "    s.connect(('93.184.216.34', 80))"
    ),
    "daemon": (
        "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n"
        "        time.sleep(1000)\n    model = None"
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_are_contained(executor, tasks_dir, name):
    result = executor.run("iris", source_for(tasks_dir, "iris", HOSTILE[name]))
    assert result.reward == -1.0 and result.status in ("error", "timeout"), result
    # the pool still scores an honest program correctly afterwards
    after = executor.run("iris", source_for(tasks_dir, "iris", LOGISTIC + "\n    x = 1"))
    assert after.status == "ok" and after.reward > 0.9


def test_file_system_is_out_of_reach(executor, tasks_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    secret.chmod(0o644)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    bodies = {
        "read": f"    model = open({str(secret)!r}).read()",
        "read_repo": f"    model = open({str(REPO / 'params.yaml')!r}).read()",
        "delete": f"    import os\n    os.remove({str(victim)!r})",
        "write": f"    open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
    }
    for name, body in bodies.items():
        result = executor.run("iris", source_for(tasks_dir, "iris", body))
        assert result.status == "error", (name, result)
        if bwrap_available():
            assert (
                "Error" in result.error
                and "No such file" in result.error
                or "Permission denied" in result.error
            ), (name, result.error)
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "new.txt").exists()


@pytest.mark.skipif(not bwrap_available(), reason="needs bubblewrap")
def test_nothing_outlives_a_program(executor, tasks_dir):
    executor.run("iris", source_for(tasks_dir, "iris", HOSTILE["daemon"]))
    executor.run("iris", source_for(tasks_dir, "iris", HOSTILE["fork_bomb"]))
    descendants = [
        child
        for worker in executor._all
        for child in psutil.Process(worker.process.pid).children(recursive=True)
    ]
    assert descendants, "the workers should be running"
    # each worker is bwrap (init) + the harness; a surviving daemon is a forked harness too
    harnesses = [p for p in descendants if p.name() != "bwrap"]
    assert len(harnesses) == len(executor._all), [p.as_dict(["pid", "ppid", "uids"]) for p in harnesses]


NEAREST = (
    "    from sklearn.neighbors import KNeighborsClassifier\n"
    "    model = KNeighborsClassifier(n_neighbors=1).fit(x_train, y_train)"
)
# Keeps every training set it is given (in builtins, a module attribute and a file in its temp
# dir) and fits on all of them: rows held out in this split were training rows of earlier ones.
MEMORISING = """    import builtins, os, tempfile
    import numpy as np
    import sklearn
    from sklearn.neighbors import KNeighborsClassifier
    memo = os.path.join(tempfile.gettempdir(), "seen.npz")
    seen = getattr(builtins, "_seen", None) or getattr(sklearn, "_seen", None)
    if seen is None and os.path.exists(memo):
        with np.load(memo) as old:
            seen = (old["x"], old["y"])
    xs, ys = seen or (x_train[:0], y_train[:0])
    xs, ys = np.concatenate([xs, x_train]), np.concatenate([ys, y_train])
    builtins._seen = sklearn._seen = (xs, ys)
    try:
        np.savez(memo, x=xs, y=ys)
    except OSError:
        pass
    model = KNeighborsClassifier(n_neighbors=1).fit(xs, ys)"""


def test_a_body_that_memorises_across_splits_scores_as_the_honest_one(executor, tasks_dir):
    honest = executor.run("balance-scale", source_for(tasks_dir, "balance-scale", NEAREST))
    memorising = executor.run("balance-scale", source_for(tasks_dir, "balance-scale", MEMORISING))
    assert honest.status == memorising.status == "ok", memorising.error
    assert memorising.reward == honest.reward and memorising.score_std == honest.score_std


def test_cache_hit_is_identical(tasks_dir, tmp_path):
    config = defaults("executor", timeout_s=4.0, workers=1)
    source = source_for(tasks_dir, "balance-scale", FOREST)
    with Executor(tasks_dir, config, tmp_path / "cache") as ex:
        first = ex.run("balance-scale", source)
    with Executor(tasks_dir, config, tmp_path / "cache") as ex:
        second = ex.run("balance-scale", source)
    assert not first.cached and second.cached
    assert (second.status, second.reward, second.score_std) == (first.status, first.reward, first.score_std)


def test_run_many_keeps_job_order(executor, tasks_dir):
    jobs = [
        ("iris", source_for(tasks_dir, "iris", FAILURES["error"])),
        ("balance-scale", source_for(tasks_dir, "balance-scale", FOREST)),
        ("iris", source_for(tasks_dir, "iris", FAILURES["syntax"])),
    ]
    statuses = [r.status for r in executor.run_many(jobs)]
    assert statuses == ["error", "ok", "syntax"]


BURN = (  # 0.6 CPU s per split: under a 2 s budget in each, over it in the sum of the 5
    "    import time\n    t = time.process_time()\n    while time.process_time() - t < 0.6:\n        pass\n"
)


@pytest.mark.parametrize(
    ("name", "body", "status", "error"),
    [
        ("waits", "    import time\n    time.sleep(0.5)\n" + LOGISTIC, "ok", ""),  # 2.5 s of wall time
        ("computes", BURN + LOGISTIC, "timeout", "2.0 CPU seconds"),
        (
            "forks and lets its parent exit",
            "    import os\n    if os.fork():\n        os._exit(0)\n" + BURN + LOGISTIC,
            "timeout",
            "2.0 CPU seconds",
        ),
        (
            "ignores SIGXCPU",
            "    import signal\n    signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
            "    while True:\n        pass",
            "timeout",
            "2.0 CPU seconds",
        ),
        (
            "sleeps",
            "    import time\n    time.sleep(1000)\n" + LOGISTIC,
            "timeout",
            "wall-clock limit of 20.0 s",
        ),
    ],
)
def test_the_time_limit_is_a_cpu_budget_over_the_splits(tasks_dir, name, body, status, error):
    """A loaded machine slows a program without making it compute more, so the limit counts the
    CPU seconds of all its processes over the 5 splits; waiting is stopped by the wall-clock limit
    (10 x 2 s here, far from what a loaded CI machine could make of 3 s of CPU)."""
    config = defaults("executor", timeout_s=2.0, wall_limit_factor=10.0, workers=1, cache=False)
    with Executor(tasks_dir, config) as ex:
        result = ex.run("iris", source_for(tasks_dir, "iris", body))
    assert result.status == status and error in result.error, (name, result)
    if name == "waits":
        assert result.seconds > 2.0, result


def forked_harnesses() -> set[int]:
    """Live processes running the harness: the workers and whatever their programs forked."""
    found = psutil.process_iter(["cmdline", "status"])
    return {
        p.pid
        for p in found
        if str(HARNESS_PATH) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE
    }


def test_rlimit_fallback_contains_the_basics(tasks_dir):
    config = defaults("executor", timeout_s=2.0, wall_limit_factor=10.0, workers=1, sandbox="rlimit")
    with Executor(tasks_dir, config) as ex:
        for status in ("timeout", "memory", "syntax"):
            result = ex.run("iris", source_for(tasks_dir, "iris", FAILURES[status]))
            assert result.status == status
        assert ex.run("iris", source_for(tasks_dir, "iris", HOSTILE["os_exit"])).status == "error"
        # a daemon leaves the program's session, comes back to the worker (a subreaper) and dies
        before = forked_harnesses()
        assert ex.run("iris", source_for(tasks_dir, "iris", HOSTILE["daemon"])).status == "error"
        assert ex._all[0].process.pid in before and forked_harnesses() == before
        orphan = "    import os\n    if os.fork():\n        os._exit(0)\n" + BURN + LOGISTIC
        assert ex.run("iris", source_for(tasks_dir, "iris", orphan)).status == "timeout"
        assert ex.run("iris", source_for(tasks_dir, "iris", LOGISTIC)).status == "ok"


def test_try_command_prints_one_json_object(tasks_dir, tmp_path):
    body = tmp_path / "body.py"
    body.write_text(
        "from sklearn.naive_bayes import GaussianNB\nmodel = GaussianNB().fit(x_train, y_train)\n"
    )
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    for file, stdin in ((str(body), None), ("-", body.read_text())):
        done = subprocess.run(
            [
                "etpo",
                "try",
                "--task",
                "iris",
                "--tasks-dir",
                str(tasks_dir),
                "--params",
                str(REPO / "params.yaml"),
                file,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert set(result) == {"status", "reward", "score_std", "seconds", "error"}
        assert result["status"] == "ok" and result["reward"] > 0.9


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_rank_auc_equals_sklearn_with_ties(n_classes):
    from pipeline.sandbox.harness import auc

    rng = np.random.default_rng(n_classes)
    for _ in range(20):
        y = rng.permutation(np.arange(200) % n_classes)
        proba = rng.integers(0, 4, size=(200, n_classes)).astype(float) + 0.1  # many ties
        proba /= proba.sum(axis=1, keepdims=True)
        expected = (
            roc_auc_score(y, proba[:, 1]) if n_classes == 2 else roc_auc_score(y, proba, multi_class="ovo")
        )
        assert auc(y, proba, n_classes) == pytest.approx(expected, abs=1e-12)


def test_a_ceiling_body_scores_on_each_of_the_papers_datasets(tmp_path):
    from pipeline.tasks.bodies import grid_bodies

    names = ["credit-g", "diabetes", "cmc", "pc1", "breast-w"]
    save_tasks(build_tasks(names, []), tmp_path)
    forest = next(b for b in grid_bodies() if "RandomForestClassifier(n_estimators=50" in b)
    with Executor(tmp_path, defaults("executor", timeout_s=20.0, workers=2)) as ex:
        results = ex.run_many([(name, source_for(tmp_path, name, forest)) for name in names])
    for name, result in zip(names, results, strict=True):
        assert result.status == "ok" and 0.6 < result.reward < 1.0, (name, result)

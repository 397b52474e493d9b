"""sample@k: the open episodes' states -> one sampled action each -> trajectories (docs/design.md §4).

Under a multi-process launch (`pipeline.parallel`) each process samples a contiguous span of the
states; every state draws from its own stream, so the trajectories are those of one process.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from pipeline.config import Config
from pipeline.io import read_trajectories, write_trajectories
from pipeline.models.base import resolve_device
from pipeline.models.generate import load_sampler, sample, stream_seed
from pipeline.parallel import DataParallel
from pipeline.provenance import artifact_metadata
from pipeline.tasks.datasets import load_task
from pipeline.tasks.episodes import continuing_states, fresh_states
from pipeline.tasks.prompts import render


def run(
    config: Config,
    iteration: int,
    tasks_dir: Path,
    base_dir: Path,
    out: Path,
    adapters: Path | None = None,
    previous: Path | None = None,
) -> int:
    """Write `out`; returns the number of actions sampled."""
    tasks = [load_task(tasks_dir, name) for name in config.tasks.all_names]
    states = fresh_states(tasks, iteration, config.sampling.samples_per_state)
    if previous is not None:
        states += continuing_states(read_trajectories(previous, "executed").to_pylist())
    model, tokenizer, fim = load_sampler(config, base_dir, adapters)
    parallel = DataParallel(resolve_device(config.model.device))
    model.to(parallel.device)  # one device per process under a multi-process launch
    prompts = [render(s.state, fim) for s in states]
    lo, hi = parallel.span(len(prompts))
    with Progress(disable=not parallel.is_main) as progress:
        bar = progress.add_task(f"sample@{iteration}", total=hi - lo)

        def on_batch(sequences: int, tokens: int, seconds: float) -> None:
            progress.update(
                bar, advance=sequences, description=f"sample@{iteration} {tokens / seconds:.0f} tok/s"
            )

        mine = sample(
            model,
            tokenizer,
            prompts[lo:hi],
            config.sampling,
            stream_seed(config.seed, iteration, "sample"),
            on_batch,
            first=lo,
        )
    completions = parallel.gather(mine)
    if not parallel.is_main:
        return len(completions)
    rows = [
        {
            "iteration": iteration,
            "episode_id": s.episode_id,
            "step": s.step,
            "task": s.task,
            "sample": s.sample,
            "state": s.state,
            "prompt": p,
            "completion": c.body,
            "prompt_ids": c.prompt_ids,
            "completion_ids": c.completion_ids,
            "behaviour_logprobs": c.behaviour_logprobs,
            "truncated": c.truncated,
        }
        for s, p, c in zip(states, prompts, completions, strict=True)
    ]
    write_trajectories(out, rows, "sampled", artifact_metadata(config, base_dir))
    return len(rows)

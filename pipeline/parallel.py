"""Data parallelism: the update stages shard every minibatch, the sample stage its prompts.

Launch the train or sample stage as usual, or data-parallel with
    accelerate launch --multi_gpu --num_processes 2 -m pipeline train ...   (or torchrun)
(on a CPU too: accelerate's `--cpu` flag starts a single process unless MPI is configured).

Why not DDP (`accelerator.prepare(model)`): one backbone carries the policy, critic and target
adapters, and peft's `set_adapter` changes which of them requires grad between the critic and the
policy step; DDP fixes the set of gradient-carrying parameters when it wraps the model. Instead we
sum the adapter gradients across processes explicitly, once per optimiser step.

Why it is exact: every process scales its loss (a token mean over its shard) by its shard's share
of the minibatch's tokens, so the summed gradient is the gradient of the token mean over the whole
minibatch, as in one process. All processes then clip and step identically from identical
weights, so the adapters stay equal with no broadcast.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, get_int_from_env

# the world size a torchrun or MPI launch sets
LAUNCHED_WORLD_SIZE = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


class DataParallel:
    """The process group as seen by one update loop (a no-op in a single process)."""

    def __init__(self, device: torch.device) -> None:
        # accelerate keeps one state per process, fixed by its first Accelerator: made only under
        # a multi-process launch, so that one process (a test, a notebook) may use CPU and GPU.
        launched = get_int_from_env(LAUNCHED_WORLD_SIZE, 1) > 1
        self.accelerator = Accelerator(cpu=device.type == "cpu") if launched else None
        self.device = self.accelerator.device if self.accelerator else device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, minibatch: list[dict]) -> tuple[list[dict], bool]:
        """This process's rows of a minibatch, and whether they count.

        A process left without rows (a minibatch smaller than the world) borrows the first row
        and gives it weight 0, so every process runs the same collectives.
        """
        mine = minibatch[self.rank :: self.world]
        return (mine, True) if mine else (minibatch[:1], False)

    def span(self, n: int) -> tuple[int, int]:
        """This process's contiguous share [lo, hi) of n items (the first processes take one more)."""
        size, extra = divmod(n, self.world)
        rank = self.rank
        lo = rank * size + min(rank, extra)
        return lo, lo + size + (rank < extra)

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in process order (the spans' order)."""
        return gather_object(items) if self.world > 1 else items

    def share(self, local_tokens: torch.Tensor, counts: bool) -> torch.Tensor:
        """This shard's fraction of the minibatch's tokens: the weight of its local token mean."""
        local = local_tokens.float() if counts else torch.zeros((), device=local_tokens.device)
        return local / self.sum(local).clamp(min=1)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value.detach().clone(), "sum") if self.world > 1 else value.detach()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over processes, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "sum")
        for p, g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).clone()

    def step(
        self,
        optimiser: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        loss: torch.Tensor,
        max_norm: float,
    ) -> float:
        """One optimiser step on this shard's weighted `loss`: gradients summed over processes, then
        the global norm clipped (if max_norm > 0). Returns the norm before clipping."""
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.sum_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        optimiser.step()
        return float(norm)

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

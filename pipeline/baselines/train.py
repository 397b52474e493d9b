"""One update of a policy-gradient baseline on a minibatch of actions.

    ppo:   L_pi = clipped surrogate(pi / pi_old, A)             A: whitened GAE (targets stage)
           L_V  = 1/2 (V(prefix_j) - return_j)^2                  V: value head on the critic adapter
    grpo:  L_pi = clipped surrogate(pi / pi_old, A) + kl_coef k3(pi, rho)   A: group-relative

pi_old is the behaviour policy, whose log-probs the sample stage recorded: pi itself, since
config.py refuses a warped sampler (temperature, top-k, top-p) for the training algorithms.
The epochs, minibatches and optimisers are `pipeline.models.update`'s.
"""

from __future__ import annotations

from peft import PeftModel
from torch import Tensor

from pipeline.baselines.losses import clipped_surrogate, k3_kl, value_loss
from pipeline.config import GrpoConfig, PpoConfig
from pipeline.models.logits import action_hidden, action_logits
from pipeline.models.tokens import entropy, masked_mean
from pipeline.models.update import Minibatch, Step


def ppo_update(model: PeftModel, mb: Minibatch, step: Step, ppo: PpoConfig) -> dict[str, Tensor]:
    """A clipped-surrogate policy step, then a value step on the critic adapter's value head."""
    metrics = _policy_step(model, mb, step, ppo.clip, kl_coef=0.0)
    values = model.value_head(action_hidden(model, mb.batch, "critic")).squeeze(-1)
    loss_v = value_loss(values, mb.column("q_target"), mb.batch.mask)
    step("critic", loss_v)
    return metrics | {"train/value_loss": loss_v}


def grpo_update(model: PeftModel, mb: Minibatch, step: Step, grpo: GrpoConfig) -> dict[str, Tensor]:
    """A clipped-surrogate policy step with a per-token KL(pi || rho) loss; no critic."""
    return _policy_step(model, mb, step, grpo.clip, grpo.kl_coef)


def _policy_step(
    model: PeftModel, mb: Minibatch, step: Step, clip: float, kl_coef: float
) -> dict[str, Tensor]:
    batch = mb.batch
    metrics = {}
    logp_all = action_logits(model, batch, "policy").float().log_softmax(-1)  # (B, T, V)
    logp = logp_all.gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)
    loss_pi = clipped_surrogate(
        logp, mb.column("behaviour_logprobs"), mb.column("advantage"), batch.mask, clip
    )
    if kl_coef > 0:  # k3 needs log rho of the taken tokens only: stored by the targets stage
        kl = k3_kl(logp, mb.column("ref_logprob"), batch.mask)
        loss_pi = loss_pi + kl_coef * kl
        metrics["train/kl_ref"] = kl
    step("policy", loss_pi)
    return metrics | {
        "train/policy_loss": loss_pi,
        "train/entropy": masked_mean(entropy(logp_all), batch.mask),
    }

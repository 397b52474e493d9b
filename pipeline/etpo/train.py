"""One ETPO update on a minibatch of actions: critic step, policy step, Polyak target.

Read top to bottom:
    z_rho    = reference logits                      (no grad)
    z_critic = critic logits;   L_Q  = Huber(Q_phi(w^j) - y_j)            -> critic step
    z_pi     = policy logits;   L_pi = KL(pi || pi_star[z_critic, z_rho])  -> policy step
    target  <- (1 - tau) target + tau critic
The epochs, minibatches and optimisers are `pipeline.models.update`'s.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.config import EtpoConfig
from pipeline.etpo.losses import critic_loss, policy_loss, polyak_update
from pipeline.models.adapters import adapter_parameters
from pipeline.models.logits import ActionBatch, action_logits, action_logits_and_hidden
from pipeline.models.tokens import entropy, kl_to_reference, masked_mean
from pipeline.models.update import Minibatch, Step


def critic_outputs(
    model: PeftModel, batch: ActionBatch, adapter: str, etpo: EtpoConfig
) -> tuple[Tensor, Tensor | None]:
    """A critic's logits (B, T, V) and, for the dueling parametrisation, its state values (B, T)
    from the value head of that adapter (`value_head` for the critic, `target_value_head`)."""
    if etpo.parametrisation != "dueling":
        return action_logits(model, batch, adapter), None
    head = {"critic": model.value_head, "target": model.target_value_head}[adapter]
    z, hidden = action_logits_and_hidden(model, batch, adapter)
    return z, head(hidden).squeeze(-1)


def etpo_update(model: PeftModel, mb: Minibatch, step: Step, etpo: EtpoConfig) -> dict[str, Tensor]:
    """Update the critic, policy and target adapters of `model` in place; return per-token means."""
    batch = mb.batch
    y = mb.column("q_target")  # (B, T) targets, 0 past each action
    with torch.no_grad():
        z_rho = action_logits(model, batch, None)  # (B, T, V)

    # peft's set_adapter (inside action_logits) makes exactly the active adapter trainable
    z_critic, v = critic_outputs(model, batch, "critic", etpo)
    loss_q = critic_loss(
        z_critic, z_rho, batch.taken, y, batch.mask, etpo.beta, etpo.huber_delta, etpo.parametrisation, v
    )
    step("critic", loss_q)

    z_pi = action_logits(model, batch, "policy")
    loss_pi = policy_loss(z_pi, z_rho, z_critic, batch.mask, etpo.beta, etpo.parametrisation)
    step("policy", loss_pi)

    target = adapter_parameters(model, "target") + list(model.target_value_head.parameters())
    polyak_update(target, adapter_parameters(model, "critic") + list(model.value_head.parameters()), etpo.tau)
    with torch.no_grad():
        logp_pi, logp_rho = z_pi.float().log_softmax(-1), z_rho.float().log_softmax(-1)
        return {
            "train/critic_loss": loss_q,
            "train/policy_loss": loss_pi,
            "train/kl_ref": masked_mean(kl_to_reference(logp_pi, logp_rho), batch.mask),
            "train/entropy": masked_mean(entropy(logp_pi), batch.mask),
        }

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
from pipeline.models.logits import action_logits
from pipeline.models.tokens import entropy, kl_to_reference, masked_mean
from pipeline.models.update import Minibatch, Step


def etpo_update(model: PeftModel, mb: Minibatch, step: Step, etpo: EtpoConfig) -> dict[str, Tensor]:
    """Update the critic, policy and target adapters of `model` in place; return per-token means."""
    batch = mb.batch
    y = mb.column("q_target")  # (B, T) targets, 0 past each action
    with torch.no_grad():
        z_rho = action_logits(model, batch, None)  # (B, T, V)

    # peft's set_adapter (inside action_logits) makes exactly the active adapter trainable
    z_critic = action_logits(model, batch, "critic")
    loss_q = critic_loss(
        z_critic, z_rho, batch.taken, y, batch.mask, etpo.beta, etpo.huber_delta, etpo.parametrisation
    )
    step("critic", loss_q)

    z_pi = action_logits(model, batch, "policy")
    loss_pi = policy_loss(z_pi, z_rho, z_critic, batch.mask, etpo.beta, etpo.parametrisation)
    step("policy", loss_pi)

    polyak_update(adapter_parameters(model, "target"), adapter_parameters(model, "critic"), etpo.tau)
    with torch.no_grad():
        logp_pi, logp_rho = z_pi.float().log_softmax(-1), z_rho.float().log_softmax(-1)
        return {
            "train/critic_loss": loss_q,
            "train/policy_loss": loss_pi,
            "train/kl_ref": masked_mean(kl_to_reference(logp_pi, logp_rho), batch.mask),
            "train/entropy": masked_mean(entropy(logp_pi), batch.mask),
        }

"""One ETPO update on a minibatch of actions: critic step, policy step, Polyak target.

Read top to bottom:
    z_critic = critic logits;   L_Q  = Huber(Q_phi(w^j) - y_j)            -> critic step
                                     [+ alpha KL(pi_bar || pi_c) off the taken tokens]
    z_pi     = policy logits;   L_pi = KL(pi || pi_T)                      -> policy step
        pi_T = pi_star[z_critic] (`vocabulary`), or rho tilted at the taken token by the stored
        y_j - V_j (`return`, the default) or the critic's advantage (`taken`), times
        min(1 / mu(a), C) (`importance`); [pi_T^(beta/(beta+eta)) pi_k^(eta/(beta+eta)): proximal]
    target  <- (1 - tau) target + tau critic
The reference enters Q_phi(w^j) only through its values at the taken token, which the targets
stage stored (ref_logit, ref_logprob): the reference never changes, so it runs once per action,
not once per epoch. pi_star = softmax(z_critic) for the residual and dueling critics; only the
paper's parametrisation (pi_star ∝ rho exp(z_critic / beta)) and `etpo.policy_target` taken or
return (rho's shape off the taken token) need a reference pass here, and `etpo.proximal` a pass of
the frozen pi_k: the default step runs both, without gradients, in the first epoch only (neither
changes during train@k, so `FrozenLogits` keeps them for the others).
The epochs, minibatches and optimisers are `pipeline.models.update`'s.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.config import EtpoConfig
from pipeline.etpo.losses import critic_loss, importance_weights, policy_loss, polyak_update, untaken_kl
from pipeline.models.adapters import PREVIOUS_POLICY, adapter_parameters
from pipeline.models.logits import ActionBatch, FrozenLogits, action_logits, action_logits_and_hidden
from pipeline.models.tokens import entropy, masked_mean
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


def critic_objective(
    model: PeftModel, batch: ActionBatch, y: Tensor, ref_logit: Tensor, ref_logprob: Tensor, etpo: EtpoConfig
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The critic's loss on one minibatch, its parts to log, and the critic's logits z_critic.

    y, ref_logit, ref_logprob: (B, T), the targets and rho's values at the taken tokens. With
    `etpo.untaken_anchor` > 0 the loss adds that weight times `untaken_kl` against the target
    critic, whose logits are read first: the critic's pass is then the last adapter switch
    before its backward.
    """
    z_bar = None
    if etpo.untaken_anchor > 0:
        with torch.no_grad():
            z_bar = action_logits(model, batch, "target")
    # peft's set_adapter (inside action_logits) makes exactly the active adapter trainable
    z_critic, v = critic_outputs(model, batch, "critic", etpo)
    loss_q = critic_loss(
        z_critic,
        ref_logit,
        ref_logprob,
        batch.taken,
        y,
        batch.mask,
        etpo.beta,
        etpo.huber_delta,
        etpo.parametrisation,
        v,
    )
    logged = {"train/critic_loss": loss_q}
    if z_bar is not None:
        logged["train/untaken_kl"] = anchor = untaken_kl(z_critic, z_bar, batch.taken, batch.mask)
        loss_q = loss_q + etpo.untaken_anchor * anchor
    return loss_q, logged, z_critic


def etpo_update(
    model: PeftModel, mb: Minibatch, step: Step, etpo: EtpoConfig, frozen: FrozenLogits | None = None
) -> dict[str, Tensor]:
    """Update the critic, policy and target adapters of `model` in place; return per-token means.

    `frozen` keeps rho's and pi_k's logits across the calls of one train stage (none: recomputed)."""
    frozen = frozen or FrozenLogits(0)
    batch = mb.batch
    y = mb.column("q_target")  # (B, T) targets, 0 past each action
    ref_logit, ref_logprob = mb.column("ref_logit"), mb.column("ref_logprob")  # (B, T), of rho

    loss_q, logged, z_critic = critic_objective(model, batch, y, ref_logit, ref_logprob, etpo)
    step("critic", loss_q)

    z_rho = None
    at_taken = etpo.policy_target != "vocabulary"
    if etpo.parametrisation == "paper" or at_taken:
        z_rho = frozen(model, batch, None)
    z_previous = None
    if etpo.proximal > 0:  # pi_k: the policy as train@k started (`pipeline.algorithms.prepare_update`)
        z_previous = frozen(model, batch, PREVIOUS_POLICY)
    # the policy's pass is the last adapter switch before its backward (peft's set_adapter)
    z_pi = action_logits(model, batch, "policy")
    taken = batch.taken if at_taken else None
    # the observed return's advantage y_j - V_j, as the targets stage stored it (no critic pass)
    advantage = mb.column("advantage") if etpo.policy_target == "return" else None
    args = (z_pi, z_critic, batch.mask, etpo.beta, etpo.parametrisation)
    weights = None  # min(1 / mu(a), cap), mu the policy that drew the token (this or a replayed iteration)
    if etpo.importance > 1:
        weights = importance_weights(mb.column("behaviour_logprobs"), etpo.importance)
    loss_pi = policy_loss(*args, z_rho, taken, advantage, z_previous, etpo.proximal, weights)
    step("policy", loss_pi)

    target = adapter_parameters(model, "target") + list(model.target_value_head.parameters())
    polyak_update(target, adapter_parameters(model, "critic") + list(model.value_head.parameters()), etpo.tau)
    with torch.no_grad():
        logp_pi = z_pi.float().log_softmax(-1)
        logp_taken = logp_pi.gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)
        return logged | {
            "train/policy_loss": loss_pi,
            # log pi/rho of tokens the behaviour policy drew: near KL(pi || rho) while pi stays
            # near that policy (the exact KL is eval's)
            "train/logratio_ref": masked_mean(logp_taken - ref_logprob, batch.mask),
            "train/entropy": masked_mean(entropy(logp_pi), batch.mask),
        }

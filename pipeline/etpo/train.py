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
the frozen pi_k. Neither changes during train@k, so the default step (`return`) builds its target
from them once per action, in the first epoch, and `FrozenLogits` keeps it for the others.
The KL and its gradient run chunk by chunk over the valid positions (`projection`).
The epochs, minibatches and optimisers are `pipeline.models.update`'s.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.config import EtpoConfig
from pipeline.etpo.losses import (
    critic_loss,
    importance_weights,
    policy_target,
    polyak_update,
    projection,
    untaken_kl,
)
from pipeline.models.adapters import PREVIOUS_POLICY, adapter_parameters
from pipeline.models.logits import (
    ActionBatch,
    FrozenLogits,
    action_logits,
    action_logits_and_hidden,
    frozen_logits,
)
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

    `frozen` keeps what the fixed networks give across the calls of one train stage (none:
    recomputed): the `return` target itself, else rho's and pi_k's logits."""
    frozen = frozen or FrozenLogits(0)
    batch = mb.batch
    valid = batch.mask != 0
    y = mb.column("q_target")  # (B, T) targets, 0 past each action
    ref_logit, ref_logprob = mb.column("ref_logit"), mb.column("ref_logprob")  # (B, T), of rho

    loss_q, logged, z_critic = critic_objective(model, batch, y, ref_logit, ref_logprob, etpo)
    step("critic", loss_q)

    if etpo.policy_target == "return":  # reads rho and pi_k only: fixed through train@k
        read = ["advantage"] + (["behaviour_logprobs"] if etpo.importance > 1 else [])
        constants = [tuple(tuple(r[key]) for key in read) for r in mb.rows]  # what else the target reads
        log_target, log_z = frozen.keep("return", batch, lambda: return_target(model, mb, etpo), constants)
        z_pi = action_logits(model, batch, "policy")  # the last adapter switch before its backward
    else:
        z_rho = (
            frozen(model, batch, None)
            if etpo.parametrisation == "paper" or etpo.policy_target == "taken"
            else None
        )
        z_previous = frozen(model, batch, PREVIOUS_POLICY) if etpo.proximal > 0 else None
        z_pi = action_logits(model, batch, "policy")
        taken = batch.taken if etpo.policy_target == "taken" else None
        target = policy_target(
            z_pi, z_critic, etpo.beta, etpo.parametrisation, z_rho, taken, None, z_previous, etpo.proximal,
            behaviour_weights(mb, etpo),
        )  # fmt: skip
        log_target, log_z = (t[valid] for t in target)
    kl, entropy, log_normaliser = projection(z_pi, log_target, log_z, valid)
    loss_pi = kl.sum() / max(1, kl.numel())  # the mean over valid tokens
    step("policy", loss_pi)

    target = adapter_parameters(model, "target") + list(model.target_value_head.parameters())
    polyak_update(target, adapter_parameters(model, "critic") + list(model.value_head.parameters()), etpo.tau)
    with torch.no_grad():
        logp_taken = z_pi.gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)[valid] - log_normaliser
        return logged | {
            "train/policy_loss": loss_pi,
            # log pi/rho of tokens the behaviour policy drew: near KL(pi || rho) while pi stays
            # near that policy (the exact KL is eval's)
            "train/logratio_ref": (logp_taken - ref_logprob[valid]).sum() / max(1, kl.numel()),
            "train/entropy": entropy.sum() / max(1, kl.numel()),
        }


def return_target(model: PeftModel, mb: Minibatch, etpo: EtpoConfig) -> tuple[Tensor, Tensor]:
    """`policy_target` for `etpo.policy_target: return`, (B, T, V) and (B, T): rho tilted at the
    taken tokens by the stored y_j - V_j (times the importance weights), and the proximal step
    from pi_k toward it; rho and pi_k from passes without gradients."""
    z_rho = frozen_logits(model, mb.batch, None)
    z_previous = frozen_logits(model, mb.batch, PREVIOUS_POLICY) if etpo.proximal > 0 else None
    return policy_target(
        None, None, etpo.beta, etpo.parametrisation, z_rho, mb.batch.taken, mb.column("advantage"),
        z_previous, etpo.proximal, behaviour_weights(mb, etpo),
    )  # fmt: skip


def behaviour_weights(mb: Minibatch, etpo: EtpoConfig) -> Tensor | None:
    """(B, T) min(1 / mu(a), cap), mu the policy that drew the token (this or a replayed iteration);
    None where `etpo.importance` is off."""
    return (
        importance_weights(mb.column("behaviour_logprobs"), etpo.importance) if etpo.importance > 1 else None
    )

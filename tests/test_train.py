"""The train stage's update on the tiny preset."""

import itertools
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms import prepare_update, update_for
from pipeline.baselines.targets import action_stats
from pipeline.etpo.losses import importance_weights, policy_loss, untaken_kl
from pipeline.etpo.targets import action_targets, etpo_targets
from pipeline.etpo.train import critic_objective, etpo_update
from pipeline.models.adapters import (
    PREVIOUS_POLICY,
    adapter_parameters,
    attach_adapters,
    load_adapters,
    save_adapters,
)
from pipeline.models.base import load_base
from pipeline.models.logits import (
    PROMPT_SLACK,
    ActionBatch,
    FrozenLogits,
    _similar_lengths,
    action_hidden,
    action_logits,
    action_logits_and_hidden,
    fill_by_states,
    length_batches,
    per_token,
)
from pipeline.models.update import make_optimisers, save_optimisers, train_adapters
from pipeline.stages.policy_eval import mean_kl_to_reference
from tests.conftest import DEFAULTS, defaults, plain_etpo


def rows_for(model, tokenizer, rewards):
    """Two actions of one state with terminal targets `rewards`, and the reference's values at
    their tokens as the targets stage stores them."""
    prompt = tokenizer("def build_model(x, y):\n", add_special_tokens=False)["input_ids"]
    bodies = ["    model = 1\n", "    return model\n"]
    rows = []
    for body, reward in zip(bodies, rewards, strict=True):
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        rows.append(
            {"prompt_ids": prompt, "completion_ids": ids, "q_target": [0.0] * (len(ids) - 1) + [reward]}
        )
    return with_reference(model, rows)


def with_reference(model, rows):
    for row, stats in zip(rows, action_stats(model, rows, values=False), strict=True):
        row.update(ref_logit=stats["ref_logit"], ref_logprob=stats["ref_logprob"])
    return rows


def policy_logits(model, tokenizer):
    ids = tokenizer("def build_model(x, y):\n    model", return_tensors="pt", add_special_tokens=False)
    model.set_adapter("policy")
    with torch.no_grad():
        return model(**ids).logits


# the parametrisations, and the policy target trusted at the taken token only
CRITIC_AND_POLICY_TARGETS = [("residual", "vocabulary"), ("dueling", "vocabulary"), ("residual", "taken")]


@pytest.mark.parametrize(("param", "target"), CRITIC_AND_POLICY_TARGETS)
def test_an_untrained_critic_leaves_the_policy_unchanged(tiny_base, param, target):
    """At initialisation the update is a no-op: pi_star = softmax(z_critic) = rho = pi (and so is
    the target trusted at the taken token only)."""
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    before = policy_logits(model, tokenizer)
    train = defaults("train", epochs=2, minibatch_size=1, policy_lr=1e-2, critic_lr=0.0)  # critic stays at 0
    update = partial(etpo_update, etpo=plain_etpo(parametrisation=param, policy_target=target))
    train_adapters(model, rows_for(model, tokenizer, [1.0, -1.0]), update, train, seed=0)
    assert torch.allclose(policy_logits(model, tokenizer), before, atol=1e-6)


@pytest.mark.parametrize(("param", "target"), CRITIC_AND_POLICY_TARGETS)
def test_a_trained_critic_moves_the_policy_and_polyak_tracks_it(tiny_base, param, target):
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    before = policy_logits(model, tokenizer)
    logged = []
    train = defaults("train", epochs=3, minibatch_size=2, policy_lr=1e-2, critic_lr=1e-2)
    steps = train_adapters(
        model,
        rows_for(model, tokenizer, [1.0, -1.0]),
        partial(etpo_update, etpo=plain_etpo(tau=0.5, parametrisation=param, policy_target=target)),
        train,
        seed=0,
        log=logged.append,
    )
    assert steps == 3 and len(logged) == 3 and {"train/critic_loss", "train/policy_loss"} <= set(logged[0])
    assert not torch.allclose(policy_logits(model, tokenizer), before, atol=1e-4)
    critic, target = adapter_parameters(model, "critic"), adapter_parameters(model, "target")
    assert len(critic) == len(target) > 0
    moved = sum((t - c).abs().sum() for t, c in zip(target, critic, strict=True))
    assert 0 < moved < sum(c.abs().sum() for c in critic)  # the target trails the critic
    v, v_target = model.value_head.weight, model.target_value_head.weight
    if param == "dueling":  # V_psi is fitted, and its target trails it too
        assert 0 < (v_target - v).abs().sum() < v.abs().sum()
    else:
        assert v.abs().sum() == 0 == v_target.abs().sum()


def perturbed(tiny_base, adapter):
    """The tiny model with fresh adapters, `adapter`'s weights moved away from the others'."""
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    with torch.no_grad():
        for p in adapter_parameters(model, adapter):
            p.add_(0.3 * torch.randn_like(p))
    return model, tokenizer


def test_the_policy_step_projects_onto_the_target_its_setting_names(tiny_base):
    """The first step's logged policy loss is `policy_loss` with rho's logits and the taken tokens
    for `policy_target: taken`, with the stored `advantage` (y - V) as well for `return`, with the stored
    behaviour log-probs as well for `etpo.importance`, and with none for `vocabulary`; the
    default is `return` weighted, with the policy as train started as pi_k (`etpo.proximal`); the
    five differ (a critic perturbed away from rho and held there)."""
    first = {}
    settings = {
        "vocabulary": plain_etpo(),
        "taken": plain_etpo(policy_target="taken"),
        "return": plain_etpo(policy_target="return"),
        "importance": plain_etpo(policy_target="return", importance=10.0),
        "default": DEFAULTS.etpo,
    }
    for target, etpo in settings.items():
        model, tokenizer = perturbed(tiny_base, "critic")
        prepare_update(replace(DEFAULTS, etpo=etpo), model)
        rows = rows_for(model, tokenizer, [1.0, -1.0])
        for row, value in zip(rows, [0.3, -0.2], strict=True):
            row["advantage"] = [y - value for y in row["q_target"]]  # y - V as the targets stage stores it
            row["behaviour_logprobs"] = [-0.5 - 0.25 * j for j in range(len(row["completion_ids"]))]
        batch = ActionBatch.build([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
        with torch.no_grad():
            z_pi, z_critic = action_logits(model, batch, "policy"), action_logits(model, batch, "critic")
            z_rho = action_logits(model, batch, None)
        args = (z_pi, z_critic, batch.mask, 0.1, "residual")
        advantage = per_token(rows, "advantage", batch)
        behaviour = per_token(rows, "behaviour_logprobs", batch)
        want = {
            "vocabulary": policy_loss(*args),
            "taken": policy_loss(*args, z_rho, batch.taken),
            "return": policy_loss(*args, z_rho, batch.taken, advantage),
            "importance": policy_loss(
                *args, z_rho, batch.taken, advantage, importance=importance_weights(behaviour, 10.0)
            ),
            "default": policy_loss(
                *args, z_rho, batch.taken, advantage, z_pi, etpo.proximal, importance_weights(behaviour, 10.0)
            ),
        }[target]
        logged = []
        train = defaults("train", epochs=1, minibatch_size=2, policy_lr=1e-2, critic_lr=0.0)
        train_adapters(model, rows, partial(etpo_update, etpo=etpo), train, seed=0, log=logged.append)
        first[target] = logged[0]["train/policy_loss"]
        assert first[target] == pytest.approx(want.item(), rel=1e-5), target
    for (a, x), (b, y) in itertools.combinations(first.items(), 2):  # apart by 100x the match's tolerance
        assert x != pytest.approx(y, rel=1e-3), (a, b, x, y)


def test_the_proximal_step_reads_a_frozen_copy_of_the_policy_as_train_started(tiny_base, tmp_path):
    """`etpo.proximal`: `prepare_update` copies the policy into an adapter no optimiser holds; a
    step taken after the policy moved logs `policy_loss` with the *start's* logits as pi_k (not
    the current policy's); the copy never moves, and the saved adapters are the usual three."""
    model, tokenizer = perturbed(tiny_base, "policy")
    rows = rows_for(model, tokenizer, [1.0, -1.0])
    for row in rows:
        row["advantage"] = [y - 0.1 for y in row["q_target"]]  # y - V, V = 0.1
    etpo = plain_etpo(policy_target="return", proximal=0.5)
    prepare_update(replace(DEFAULTS, etpo=etpo), model)
    previous = [p.detach().clone() for p in adapter_parameters(model, PREVIOUS_POLICY)]
    policy = [p.detach().clone() for p in adapter_parameters(model, "policy")]
    assert all(torch.equal(a, b) for a, b in zip(previous, policy, strict=True)) and previous
    batch = ActionBatch.build([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    advantage = per_token(rows, "advantage", batch)
    with torch.no_grad():
        z_start, z_rho = action_logits(model, batch, "policy"), action_logits(model, batch, None)
    # one minibatch of both rows: one step per call
    train = defaults("train", epochs=1, minibatch_size=2, policy_lr=1e-2, critic_lr=0.0)
    update = partial(etpo_update, etpo=etpo)
    train_adapters(model, rows, update, train, seed=0)
    with torch.no_grad():
        z_moved = action_logits(model, batch, "policy")
        args = (z_moved, z_moved, batch.mask, etpo.beta, etpo.parametrisation, z_rho, batch.taken, advantage)
        want = policy_loss(*args, z_start, etpo.proximal)
        from_current = policy_loss(*args, z_moved, etpo.proximal)
    logged = []
    train_adapters(model, rows, update, train, seed=0, log=logged.append)
    assert logged[0]["train/policy_loss"] == pytest.approx(want.item(), rel=1e-5)
    assert abs(want.item() - from_current.item()) > 1e-4
    after = adapter_parameters(model, PREVIOUS_POLICY)
    assert all(torch.equal(a, b) for a, b in zip(previous, after, strict=True))
    moved = adapter_parameters(model, "policy")
    assert not all(torch.equal(a, b) for a, b in zip(policy, moved, strict=True))
    save_adapters(model, tmp_path / "adapters")
    saved = sorted(p.name for p in (tmp_path / "adapters").iterdir() if p.is_dir())
    assert saved == ["critic", "policy", "target"]


def critic_after(model, rows, etpo):
    """The critic's untaken_kl against the target critic, and its Huber loss at the taken tokens,
    over `rows`."""
    batch = ActionBatch.build([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    y, ref_logit, ref_logprob = (per_token(rows, k, batch) for k in ("q_target", "ref_logit", "ref_logprob"))
    with torch.no_grad():
        z_target = action_logits(model, batch, "target")
        plain = replace(etpo, untaken_anchor=0.0)
        fit, _, z_critic = critic_objective(model, batch, y, ref_logit, ref_logprob, plain)
    return untaken_kl(z_critic, z_target, batch.taken, batch.mask).item(), fit.item()


def test_the_untaken_anchor_holds_the_critic_to_the_target_off_the_taken_tokens(tiny_base):
    """The same critic steps on the same actions, with and without the anchor, and a target
    critic that differs from the critic, rho and the policy (its weights perturbed; tau 0 keeps
    it): both fit the taken tokens, only the anchored critic moves its untaken tokens'
    distribution to the target's, and only it logs the anchor's KL (the free one runs no target
    pass). An anchor against any other adapter, or against rho, would leave it where it was."""
    moved, fit, logged = {}, {}, {}
    for alpha in (0.0, 10.0):
        model, tokenizer = perturbed(tiny_base, "target")
        rows = rows_for(model, tokenizer, [1.0, -1.0])
        train = defaults("train", epochs=16, minibatch_size=2, policy_lr=0.0, critic_lr=1e-2)
        # beta 1: a target of 1 is one nat of logit, which the tiny critic fits in these steps
        etpo = plain_etpo(tau=0.0, beta=1.0, untaken_anchor=alpha)
        logged[alpha] = []
        train_adapters(model, rows, partial(etpo_update, etpo=etpo), train, seed=0, log=logged[alpha].append)
        moved[alpha], fit[alpha] = critic_after(model, rows, etpo)
    assert "train/untaken_kl" not in logged[0.0][-1] and "train/untaken_kl" in logged[10.0][-1]
    start = logged[0.0][0]["train/critic_loss"]  # Q = 0 everywhere: the same for both
    assert fit[0.0] < 0.3 * start and fit[10.0] < 0.3 * start, (start, fit)
    assert moved[10.0] < 0.3 * moved[0.0], moved


def body_logprob(model, tokenizer, row):
    batch = ActionBatch.build([row["prompt_ids"]], [row["completion_ids"]])
    with torch.no_grad():
        logp = action_logits(model, batch, "policy").log_softmax(-1)
    return logp.gather(-1, batch.taken.unsqueeze(-1)).sum().item()


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_policy_gradient_raises_the_better_body_and_ppo_fits_its_values(tiny_base, algo):
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    rows = rows_for(model, tokenizer, [1.0, -1.0])
    for row, sign in zip(rows, [1.0, -1.0], strict=True):
        n = len(row["completion_ids"])
        row["behaviour_logprobs"] = [0.0] * n  # replaced below by the policy's own
        row["advantage"] = [sign] * n
        row["q_target"] = [2.0 * sign] * n  # PPO's returns: the value head should move toward them
    for row in rows:
        batch = ActionBatch.build([row["prompt_ids"]], [row["completion_ids"]])
        with torch.no_grad():
            logp = action_logits(model, batch, "policy").log_softmax(-1)
        row["behaviour_logprobs"] = logp.gather(-1, batch.taken.unsqueeze(-1))[0, :, 0].tolist()
    before = [body_logprob(model, tokenizer, r) for r in rows]
    logged = []
    train = defaults("train", epochs=4, minibatch_size=2, policy_lr=1e-2, critic_lr=1e-3)
    update = update_for(replace(DEFAULTS, algo=algo))
    steps = train_adapters(model, rows, update, train, seed=0, log=logged.append)
    after = [body_logprob(model, tokenizer, r) for r in rows]
    # the bodies share their first (indent) token, so compare how much each one gained
    assert steps == 4 and after[0] - before[0] > 1.0 + (after[1] - before[1])
    assert ("train/value_loss" in logged[0]) == (algo == "ppo")
    assert ("train/kl_ref" in logged[0]) == (algo == "grpo")
    if algo == "ppo":
        assert logged[-1]["train/value_loss"] < logged[0]["train/value_loss"]


def alone(model, prompt, completion, adapter):
    """The plain computation: one sequence, one forward pass, nothing shared or padded."""
    model.set_adapter("policy" if adapter is None else adapter)
    with model.disable_adapter() if adapter is None else nullcontext():
        out = model(input_ids=torch.tensor([prompt + completion]), output_hidden_states=True)
    where = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # positions predicting the completion
    return out.logits[0, where], out.hidden_states[-1][0, where]


def test_eval_kl_in_chunks_equals_each_action_alone(tiny_base):
    """eval's KL(pi || rho) per action, batched in chunks that share prompts, equals the plain
    computation on each sequence; an empty completion has KL 0."""
    model, _ = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    with torch.no_grad():
        for p in adapter_parameters(model, "policy"):
            p.normal_(0.0, 0.05)
    shared, other = [11, 12, 13, 14, 15, 16], [21, 22]
    actions = [(shared, [31, 32]), (other, [41, 42, 43]), (shared, []), (shared, [51]), (other, [61, 62])]
    got = mean_kl_to_reference(model, actions, chunk=2)
    for (prompt, completion), kl in zip(actions, got, strict=True):
        if not completion:
            assert kl == 0.0
            continue
        log_pi = alone(model, prompt, completion, "policy")[0].log_softmax(-1)
        log_rho = alone(model, prompt, completion, None)[0].log_softmax(-1)
        want = (log_pi.exp() * (log_pi - log_rho)).sum(-1).mean().item()
        assert want > 1e-4 and abs(kl - want) < 1e-5 * max(1.0, want), (kl, want)


@pytest.mark.parametrize("adapter", ["policy", "critic", None])
def test_shared_prompts_give_each_sequence_own_logits_and_gradients(tiny_base, adapter):
    """Grouped by prompt, a prompt's cache repeated over its samples: the logits, hidden states and
    the gradients of a loss on them equal those of each sequence computed alone."""
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    with torch.no_grad():  # B = 0 at initialisation: give the adapters something to differentiate
        for p in adapter_parameters(model, "policy") + adapter_parameters(model, "critic"):
            p.normal_(0.0, 0.05)
    # 6 and 5 tokens share a pass (5 is left-padded), 2 tokens goes alone (length_batches)
    shared, close, short = [11, 12, 13, 14, 15, 16], [71, 72, 73, 74, 75], [21, 22]
    prompts = [shared, short, shared, close, shared]
    completions = [[31, 32], [41, 42, 43, 44, 45], [51], [81, 82, 83], [61, 62, 63]]
    batch = ActionBatch.build(prompts, completions)
    assert batch.prompts.shape[0] == 3  # the shared prompt goes through the model once
    assert _similar_lengths(batch) == [[1], [0, 2, 3, 4]]  # rows by prompt length, in batch order
    assert length_batches([6, 2, 5], 3, PROMPT_SLACK) == [[1], [2, 0]]
    assert length_batches([6, 2, 5, 5], 4, PROMPT_SLACK, weights=[1, 1, 4, 1]) == [[1], [2], [3, 0]]
    generator = torch.Generator().manual_seed(1)
    weights, readout = torch.randn(batch.mask.shape, generator=generator), torch.randn(8, generator=generator)

    def loss_and_grads(logits, hidden):
        """A loss shaped like the algorithms': log-probs of the taken tokens and a value readout."""
        logp = logits.log_softmax(-1).gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)
        loss = ((logp + hidden[..., :8] @ readout) * weights * batch.mask).sum()
        return loss, torch.autograd.grad(loss, adapter_parameters(model, adapter))

    if adapter is None:
        logits, hidden = action_logits(model, batch, None), None  # rho: logits only, no gradients
    else:
        logits, hidden = action_logits_and_hidden(model, batch, adapter)
        assert torch.allclose(action_hidden(model, batch, adapter), hidden)
    per_sequence = [alone(model, p, c, adapter) for p, c in zip(prompts, completions, strict=True)]
    for b, (z, h) in enumerate(per_sequence):
        n = len(completions[b])
        assert torch.allclose(logits[b, :n], z, atol=1e-5), b
        if hidden is not None:
            assert torch.allclose(hidden[b, :n], h, atol=1e-5), b
    if adapter is None:
        return
    T = batch.taken.shape[1]
    padded = [
        (F.pad(z, (0, 0, 0, T - z.shape[0])), F.pad(h, (0, 0, 0, T - h.shape[0]))) for z, h in per_sequence
    ]
    want_loss, want = loss_and_grads(torch.stack([z for z, _ in padded]), torch.stack([h for _, h in padded]))
    got_loss, got = loss_and_grads(*action_logits_and_hidden(model, batch, adapter))
    assert torch.allclose(got_loss, want_loss, atol=1e-5)
    # float32 sums over differently shaped passes: errors ~1e-6 of each gradient's largest entry
    assert all((g - w).abs().max() <= 1e-5 * w.abs().max() for g, w in zip(got, want, strict=True))


def test_optimiser_state_carries_over_like_one_continuous_run(tiny_base, tmp_path):
    """Two iterations of one epoch, the adapters and Adam's state saved and reloaded in between, end
    where one run of two epochs does (one action: the order of minibatches cannot differ)."""
    _, tokenizer = load_base(tiny_base)
    update = partial(etpo_update, etpo=plain_etpo())  # pi_k is per iteration: no proximal step here
    one_epoch = defaults("train", epochs=1, minibatch_size=1, policy_lr=1e-2, critic_lr=1e-2)

    def fresh():
        torch.manual_seed(0)
        return attach_adapters(load_base(tiny_base)[0], defaults("lora", rank=4))

    rows = rows_for(fresh(), tokenizer, [1.0, -1.0])[:1]

    continuous = fresh()
    train_adapters(continuous, rows, update, replace(one_epoch, epochs=2), seed=0)
    first = fresh()
    optimisers = make_optimisers(first, one_epoch)
    train_adapters(first, rows, update, one_epoch, seed=0, optimisers=optimisers)
    save_adapters(first, tmp_path)
    save_optimisers(optimisers, tmp_path)
    results = {}
    for carried in (True, False):
        second = load_adapters(load_base(tiny_base)[0], tmp_path, trainable=True)
        state = make_optimisers(second, one_epoch, tmp_path if carried else None)
        train_adapters(second, rows, update, one_epoch, seed=0, optimisers=state)
        results[carried] = second
    for name in ("policy", "critic", "target"):
        want = adapter_parameters(continuous, name)
        for carried, model in results.items():
            got = adapter_parameters(model, name)
            close = all(torch.allclose(w, g, atol=1e-6) for w, g in zip(want, got, strict=True))
            assert close == carried, (name, carried)  # a fresh Adam takes a different second step


def test_dueling_targets_read_the_target_value_head(tiny_base):
    """With untrained adapters (z_target = z_rho, pi = rho) and a target value head that says 0.7
    everywhere, Q of every token and every soft value is 0.7, and so is the next state's value."""
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    with torch.no_grad():
        model.target_value_head.bias.fill_(0.7)
    row = rows_for(model, tokenizer, [1.0, -1.0])[0] | {"reward": -1.0, "done": False}
    etpo = defaults("etpo", parametrisation="dueling")
    got = action_targets(model, [row], [row["prompt_ids"]], etpo)[0]
    assert got["bootstrap_value"] == pytest.approx(0.7, abs=1e-5)
    assert got["q_taken"] == pytest.approx([0.7] * len(row["completion_ids"]), abs=1e-5)
    assert got["soft_value"] == pytest.approx([0.7] * len(row["completion_ids"]), abs=1e-5)
    with torch.no_grad():  # a head that reads the hidden state: Q(w_j) = V(prefix before w_j)
        model.target_value_head.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_adapter("target")
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    n_prompt = len(row["prompt_ids"])
    expected = model.target_value_head(full[n_prompt - 1 : -1]).squeeze(-1)  # positions predicting w_j
    got = action_targets(model, [row], [None], etpo)[0]
    assert got["q_taken"] == pytest.approx(expected.tolist(), abs=1e-5)
    residual_etpo = defaults("etpo", parametrisation="residual")
    residual = action_targets(model, [row], [row["prompt_ids"]], residual_etpo)[0]
    assert residual["bootstrap_value"] == pytest.approx(0.0, abs=1e-6)  # the head plays no part


def test_batched_targets_and_stats_equal_each_action_alone(tiny_base):
    """Several states' actions through each network together (each prompt once, the next prompts
    of the bootstrap values together) give the targets and baseline statistics each action gets
    alone: a state of three samples, one whose prompt is 1.2x as long (left-padded in the same
    pass), one of a prompt too long to share it; the states' rows interleaved."""
    model, tokenizer = load_base(tiny_base)
    torch.manual_seed(0)
    model = attach_adapters(model, defaults("lora", rank=4))
    with torch.no_grad():
        for name in ("policy", "target", "critic"):
            for p in adapter_parameters(model, name):
                p.normal_(0.0, 0.05)
        model.target_value_head.weight.normal_(0.0, 0.1)
        model.value_head.weight.normal_(0.0, 0.1)
    prompts = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in ("def build_model(x, y):\n", "def build_model(x_train, y):\n", "# fix it\n" * 6)
    ]
    bodies = ["    model = 1\n", "    return model\n", "    x = y\n    return x\n", "    pass\n"]
    bodies.append("    y = x\n")
    rows = [
        {"prompt_ids": prompts[s], "completion_ids": tokenizer(b, add_special_tokens=False)["input_ids"]}
        | {"reward": r, "done": r > 0}
        for s, b, r in zip([0, 1, 0, 2, 0], bodies, [1.0, -1.0, -0.5, -1.0, -0.2], strict=True)
    ]
    following = [None, prompts[0] + [11, 12], [13], prompts[2], prompts[1] + [14]]
    etpo = defaults("etpo", parametrisation="dueling", lam=0.5)
    together = etpo_targets(model, [dict(r) for r in rows], following, etpo, advance=lambda: None)

    def stats_of(batch: list[int]) -> list[dict]:
        return action_stats(model, [rows[i] for i in batch], values=True)

    stats = fill_by_states([dict(r) for r in rows], stats_of, advance=lambda: None)
    for b, row in enumerate(rows):
        alone_targets = action_targets(model, [row], [following[b]], etpo)[0]
        for name, value in alone_targets.items():
            assert together[b][name] == pytest.approx(value, rel=1e-5, abs=1e-5), (b, name)
        for name, value in action_stats(model, [row], values=True)[0].items():
            assert stats[b][name] == pytest.approx(value, rel=1e-5, abs=1e-5), (b, name)


def test_the_stored_advantage_is_the_credit_the_policy_target_uses(tiny_base):
    """`advantage` (what `etpo credit` draws) is the target critic's Q(w_j) - V_j, except for
    `policy_target: return`, whose policy is tilted by y_j - V_j; every other column is the same."""
    model, tokenizer = perturbed(tiny_base, "target")
    actions = rows_for(model, tokenizer, [1.0, -1.0])
    rows = [{k: r[k] for k in ("prompt_ids", "completion_ids")} for r in actions]
    for row, reward in zip(rows, [0.7, -1.0], strict=True):
        row |= {"reward": reward, "done": True}
    columns = {
        target: action_targets(model, rows, [None, None], defaults("etpo", policy_target=target))
        for target in ("vocabulary", "taken", "return")
    }
    for critic, returned in zip(columns["vocabulary"], columns["return"], strict=True):
        want_critic = torch.tensor(critic["q_taken"]) - torch.tensor(critic["soft_value"])
        want_return = torch.tensor(returned["q_target"]) - torch.tensor(returned["soft_value"])
        assert torch.allclose(torch.tensor(critic["advantage"]), want_critic)
        assert torch.allclose(torch.tensor(returned["advantage"]), want_return)
        assert not torch.allclose(want_critic, want_return, atol=1e-3)
        assert {k: v for k, v in critic.items() if k != "advantage"} == {
            k: v for k, v in returned.items() if k != "advantage"
        }
    assert columns["taken"] == columns["vocabulary"]


def forward_counter(model) -> list[int]:
    """A list whose one entry counts the base model's forward calls from now on."""
    calls = [0]
    model.get_base_model().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_frozen_logits_are_kept_per_action_whatever_the_minibatch(tiny_base):
    """`FrozenLogits` returns `action_logits` of each network; once an action's logits are kept, a
    minibatch of kept actions, in another order and company, runs no pass. Kept per network; past
    the budget an action is not kept, and a minibatch holding it is computed whole."""
    model, _ = perturbed(tiny_base, "policy")
    shared, other = [11, 12, 13, 14, 15, 16], [71, 72, 73, 74, 75]
    actions = [(shared, [31, 32]), (other, [41, 42, 43]), (shared, [51])]

    def batch_of(indices):
        return ActionBatch.build([actions[i][0] for i in indices], [actions[i][1] for i in indices])

    frozen = FrozenLogits(64.0)
    calls = forward_counter(model)
    first = frozen(model, batch_of([0, 1, 2]), "policy")
    assert calls[0] > 0 and len(frozen.kept) == 3
    for indices in ([2, 0], [1], [1, 2, 0]):
        calls[0] = 0
        batch = batch_of(indices)
        got = frozen(model, batch, "policy")
        assert calls[0] == 0
        with torch.no_grad():
            want = action_logits(model, batch, "policy")
        mask = batch.mask.bool()
        assert got.shape == want.shape
        assert torch.allclose(got[mask], want[mask], atol=1e-5), indices
        n = len(actions[indices[0]][1])
        assert torch.equal(got[0, :n], first[indices[0], :n])  # the kept tensor itself
    calls[0] = 0
    rho = frozen(model, batch_of([0]), None)  # another network: computed, and not the policy's
    assert calls[0] > 0 and not torch.allclose(rho[0], first[0, :2], atol=1e-3)

    V = first.shape[-1]
    one_action = FrozenLogits(3 * V * 4 / 2**20)  # room for the 3-token action, or 2 + 1 tokens
    one_action(model, batch_of([1, 0, 2]), "policy")
    assert [len(key[2]) for key in one_action.kept] == [3]  # the first that fits, then no room
    calls[0] = 0
    batch = batch_of([0, 1])
    got = one_action(model, batch, "policy")
    assert calls[0] > 0
    mask = batch.mask.bool()
    assert torch.allclose(got[mask], frozen(model, batch, "policy")[mask], atol=1e-5)


def test_kept_values_tell_apart_actions_with_the_same_tokens_and_other_constants():
    """Two samples of one state with the same tokens but other stored advantages: each is kept
    under its own constants, and a later minibatch reads each its own, in its own order."""
    frozen = FrozenLogits(64.0)
    values = torch.arange(12.0).view(2, 2, 3)  # (B, T, V): per action, per token
    got = frozen.keep(
        "return", ActionBatch.build([[1, 2]] * 2, [[3, 4]] * 2), lambda: (values,), [(0.5,), (-0.5,)]
    )
    assert torch.equal(got[0], values.view(4, 3)) and len(frozen.kept) == 2
    swapped = ActionBatch.build([[1, 2]] * 2, [[3, 4]] * 2)
    again = frozen.keep("return", swapped, lambda: (torch.zeros(2, 2, 3),), [(-0.5,), (0.5,)])
    assert torch.equal(again[0], values.flip(0).reshape(4, 3))  # kept, each its own


def test_the_update_with_kept_logits_follows_the_one_that_recomputes_them(tiny_base):
    """The default ETPO step (return, proximal, importance) over 3 epochs of shuffled minibatches:
    with its target (from rho and pi_k) kept from the first epoch, the logged losses and the
    adapters equal those of recomputing it every epoch, to float tolerance (the passes differ only
    in which actions share them)."""
    _, tokenizer = load_base(tiny_base)
    results = {}
    for budget in (4096.0, 0.0):
        model, _ = perturbed(tiny_base, "policy")
        with torch.no_grad():
            for p in adapter_parameters(model, "critic"):
                p.normal_(0.0, 0.05)
        rows = rows_for(model, tokenizer, [1.0, -1.0])
        second_state = rows_for(model, tokenizer, [0.5, -0.2])
        rows += with_reference(model, [r | {"prompt_ids": r["prompt_ids"] + [11, 12]} for r in second_state])
        for row in rows:
            n = len(row["completion_ids"])
            row.update(advantage=[y - 0.1 for y in row["q_target"]], behaviour_logprobs=[-0.2, -3.0] * n)
            row["behaviour_logprobs"] = row["behaviour_logprobs"][:n]
        settings = replace(DEFAULTS, algo="etpo", train=replace(DEFAULTS.train, logit_cache_mb=budget))
        assert settings.etpo.proximal > 0 and settings.etpo.policy_target == "return"
        prepare_update(settings, model)
        start = [p.detach().clone() for p in adapter_parameters(model, "policy")]
        train = defaults("train", epochs=3, minibatch_size=2, policy_lr=1e-2, critic_lr=1e-2)
        update = update_for(settings)
        calls = forward_counter(model)
        logged = []
        train_adapters(model, rows, update, train, seed=0, log=logged.append)
        results[budget] = (logged, adapter_parameters(model, "policy"), calls[0])
    (kept, policy_kept, passes_kept), (recomputed, policy_recomputed, passes) = results.values()
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(policy_kept, start, strict=True))
    # a minibatch is one state (2 actions): critic, rho, pi_k, policy, two passes each (prompt,
    # completions); the kept run skips rho's and pi_k's in epochs 2 and 3 of 2 minibatches each
    assert passes - passes_kept == 2 * 2 * 2 * 2 and len(kept) == len(recomputed) == 6
    for got, want in zip(kept, recomputed, strict=True):
        for key in ("train/policy_loss", "train/critic_loss", "train/logratio_ref"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(policy_kept, policy_recomputed, strict=True))

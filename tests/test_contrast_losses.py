"""RPO, SimPO, SimPO+RPO and KTO against hand evaluations of the papers' equations (float64),
their special cases, gradients, and TRL's SimPO (CPO trainer) and KTO losses on identical inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import KTOTrainer
from trl.experimental.cpo import CPOTrainer

from tests.conftest import loss_config
from trainers.losses import kto_loss, preference_loss

PRESET_CONFIGS = {
    "rpo": loss_config("rpo", beta=0.1, tau=0.5),
    "rpo_unpaired": loss_config("rpo_unpaired", beta=0.1, tau=0.75),
    "rpo_uniform": loss_config("rpo_uniform", beta=0.1),
    "rpo_diagonal": loss_config("rpo_diagonal", beta=0.1, alpha=0.8),
    "simpo": loss_config("simpo", beta=10.0, gamma_beta_ratio=0.3),
    "rpo_simpo": loss_config("rpo_simpo", beta=10.0, tau=0.5, gamma_beta_ratio=0.3),
}


def batch(m: int, n: int, seed: int, dim: int = 5, ties: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    x = {
        "policy_chosen_logps": -rand(m) * 30 - 1,
        "policy_rejected_logps": -rand(n) * 30 - 1,
        "reference_chosen_logps": -rand(m) * 30 - 1,
        "reference_rejected_logps": -rand(n) * 30 - 1,
        "chosen_lengths": torch.randint(1, 20, (m,), generator=generator),
        "rejected_lengths": torch.randint(1, 20, (n,), generator=generator),
        "chosen_embeddings": rand(m, dim) - 0.5,
        "rejected_embeddings": rand(n, dim) - 0.5,
    }
    if ties:  # repeated prompts (equal embeddings, distance 0) and equal rewards
        x["rejected_embeddings"][: min(m, n)] = x["chosen_embeddings"][: min(m, n)]
        x["rejected_embeddings"][-1] = x["rejected_embeddings"][0]
        x["policy_rejected_logps"][-1] = x["policy_rejected_logps"][0]
        x["reference_rejected_logps"][-1] = x["reference_rejected_logps"][0]
    return x


def reward_by_hand(cfg, x, side, i):
    beta = cfg["beta"]
    policy, length = float(x[f"policy_{side}_logps"][i]), int(x[f"{side}_lengths"][i])
    if cfg["name"] in ("simpo", "rpo_simpo"):
        return beta / length * policy
    return beta * (policy - float(x[f"reference_{side}_logps"][i]))


def weight_by_hand(cfg, x, i, j, m, n):
    official = cfg.get("compat") == "official"
    if cfg["name"] == "rpo_uniform":
        return 1.0 if official else 1.0 / n
    if cfg["name"] == "rpo_diagonal":
        return cfg["alpha"] if i == j else (1 - cfg["alpha"]) / (m - 1)

    def distance(a, b):
        dot = sum(float(p) * float(q) for p, q in zip(a, b, strict=True))
        return 1 - dot / math.sqrt(sum(float(p) ** 2 for p in a) * sum(float(q) ** 2 for q in b))

    scores = [math.exp(-distance(x["chosen_embeddings"][i], x["rejected_embeddings"][k]) / cfg["tau"]) for k in range(n)]
    return scores[j] / sum(scores)


def loss_by_hand(cfg, x):
    """The papers' equations, one pair at a time in Python floats."""
    m, n = len(x["policy_chosen_logps"]), len(x["policy_rejected_logps"])
    gamma = cfg.get("gamma_beta_ratio", 0.0) * cfg["beta"]
    neg_log_sigmoid = lambda z: math.log1p(math.exp(-z)) if z > -30 else -z  # noqa: E731
    if cfg["name"] == "simpo":  # diagonal only
        return sum(
            neg_log_sigmoid(reward_by_hand(cfg, x, "chosen", i) - reward_by_hand(cfg, x, "rejected", i) - gamma) for i in range(m)
        ) / m
    total = 0.0
    for i in range(m):
        for j in range(n):
            s = reward_by_hand(cfg, x, "chosen", i) - reward_by_hand(cfg, x, "rejected", j)
            w = weight_by_hand(cfg, x, i, j, m, n)
            if cfg["name"] == "rpo_diagonal" and cfg.get("compat") == "official":
                total += w * neg_log_sigmoid(s - gamma) * n  # a weighted sum over each row, then a mean over rows
            else:
                total += neg_log_sigmoid(w * s - gamma)
    return total / (m * n)


def shapes_for(name):
    paired = [(1, 1), (3, 3), (6, 6)]
    return paired if name in ("rpo_diagonal", "simpo") else paired + [(2, 5), (4, 1)]


@pytest.mark.parametrize("name", list(PRESET_CONFIGS))
@pytest.mark.parametrize("ties", [False, True])
def test_presets_match_the_equations(name, ties):
    cfg = PRESET_CONFIGS[name]
    for m, n in shapes_for(name):
        if name == "rpo_diagonal" and m == 1:
            continue
        x = batch(m, n, seed=m * 10 + n, ties=ties)
        loss, chosen_rewards, rejected_rewards = preference_loss(**x, cfg=cfg)
        assert float(loss) == pytest.approx(loss_by_hand(cfg, x), rel=1e-10), (m, n)
        assert [float(r) for r in chosen_rewards] == pytest.approx([reward_by_hand(cfg, x, "chosen", i) for i in range(m)])
        assert [float(r) for r in rejected_rewards] == pytest.approx([reward_by_hand(cfg, x, "rejected", j) for j in range(n)])


@pytest.mark.parametrize("compat", ["paper", "official"])
@pytest.mark.parametrize("name", ["rpo_uniform", "rpo_diagonal"])
def test_compat_official_matches_its_description(name, compat):
    cfg = {**PRESET_CONFIGS[name], "compat": compat}
    x = batch(4, 4, seed=7)
    assert float(preference_loss(**x, cfg=cfg)[0]) == pytest.approx(loss_by_hand(cfg, x), rel=1e-10)


@pytest.mark.parametrize("name", ["rpo", "rpo_simpo", "simpo"])
def test_compat_changes_nothing_else(name):
    x = batch(3, 3, seed=2)
    paper = preference_loss(**x, cfg={**PRESET_CONFIGS[name], "compat": "paper"})[0]
    official = preference_loss(**x, cfg={**PRESET_CONFIGS[name], "compat": "official"})[0]
    assert float(paper) == float(official)


def test_official_uniform_is_the_paper_loss_with_n_times_the_weights():
    x = batch(3, 4, seed=3)
    official = preference_loss(**x, cfg={**PRESET_CONFIGS["rpo_uniform"], "compat": "official"})[0]
    via_rpo = preference_loss(**x, cfg=loss_config("rpo", beta=0.1, weighting="uniform", compat="official"))[0]
    assert float(official) == float(via_rpo)
    paper_with_scaled_beta = preference_loss(**x, cfg={**PRESET_CONFIGS["rpo_uniform"], "beta": 0.4})[0]
    assert float(official) == pytest.approx(float(paper_with_scaled_beta), rel=1e-12)  # W = 1 = N * (1/N)


def test_small_tau_on_distinct_prompts_approaches_dpo_pairing():
    m = 4
    x = batch(m, m, seed=11)
    x["rejected_embeddings"] = x["chosen_embeddings"].clone()  # same-prompt pairs: distance 0 on the diagonal
    dpo = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in x.items() if "embeddings" not in k}
    rpo = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in x.items()}
    dpo_loss = preference_loss(**dpo, cfg=loss_config("dpo", beta=0.1))[0]
    rpo_loss = preference_loss(**rpo, cfg=loss_config("rpo", beta=0.1, tau=1e-3))[0]
    # off-diagonal weights vanish: those entries are log 2 constants, the diagonal is DPO
    expected = (m * dpo_loss.item() + (m * m - m) * math.log(2)) / (m * m)
    assert rpo_loss.item() == pytest.approx(expected, rel=1e-9)
    dpo_loss.backward()
    rpo_loss.backward()
    for key in ("policy_chosen_logps", "policy_rejected_logps"):
        torch.testing.assert_close(rpo[key].grad, dpo[key].grad / m)


def test_uniform_with_one_rejected_equals_dpo():
    x = batch(1, 1, seed=5)
    cfg_dpo = loss_config("dpo", beta=0.1)
    uniform = preference_loss(**x, cfg=PRESET_CONFIGS["rpo_uniform"])
    plain = {k: v for k, v in x.items() if "embeddings" not in k}
    dpo = preference_loss(**plain, cfg=cfg_dpo)
    assert [float(t.sum()) for t in uniform] == [float(t.sum()) for t in dpo]
    x = batch(3, 1, seed=6)  # each of three chosen against the one rejected: DPO on repeated rejected
    repeated = {k: (v.repeat(3) if "rejected" in k else v) for k, v in x.items() if "embeddings" not in k}
    assert float(preference_loss(**x, cfg=PRESET_CONFIGS["rpo_uniform"])[0]) == pytest.approx(
        float(preference_loss(**repeated, cfg=cfg_dpo)[0]), rel=1e-12
    )


def test_rpo_with_the_ipo_link_and_a_margin():
    x = batch(3, 3, seed=8)
    margin = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    cfg = loss_config("rpo", beta=0.1, tau=0.5, link="ipo", reward="log_ratio", sr_lambda=0.5)
    loss = preference_loss(**x, cfg=cfg, margin=margin)[0]
    total = 0.0
    for i in range(3):
        for j in range(3):
            s = reward_by_hand(cfg, x, "chosen", i) - reward_by_hand(cfg, x, "rejected", j)
            h = weight_by_hand(cfg, x, i, j, 3, 3) * s / 0.1
            total += (h - 0.5 * float(margin[i]) - 1 / (2 * 0.1)) ** 2
    assert float(loss) == pytest.approx(total / 9, rel=1e-10)


@pytest.mark.parametrize("name", list(PRESET_CONFIGS))
def test_gradients_match_finite_differences(name):
    m, n = (3, 3) if name in ("rpo_diagonal", "simpo") else (3, 4)
    x = batch(m, n, seed=1)
    chosen, rejected = x.pop("policy_chosen_logps").requires_grad_(), x.pop("policy_rejected_logps").requires_grad_()
    cfg = PRESET_CONFIGS[name]
    assert torch.autograd.gradcheck(lambda c, r: preference_loss(c, r, cfg=cfg, **x)[0], (chosen, rejected))


def test_contrast_errors_are_clear():
    x = batch(3, 2, seed=0)
    with pytest.raises(ValueError, match="'diagonal_emphasis' needs paired data"):
        preference_loss(**x, cfg=PRESET_CONFIGS["rpo_diagonal"])
    with pytest.raises(ValueError, match="needs chosen_embeddings"):
        preference_loss(**{**x, "chosen_embeddings": None}, cfg=PRESET_CONFIGS["rpo"])
    with pytest.raises(ValueError, match="loss.tau=None: give a number"):
        preference_loss(**x, cfg=loss_config("rpo", tau=None))
    with pytest.raises(ValueError, match="loss.weighting='nope'"):
        preference_loss(**x, cfg={**PRESET_CONFIGS["rpo"], "weighting": "nope"})
    with pytest.raises(ValueError, match="got 0 chosen and 2 rejected"):
        empty = {k: v[:0] for k, v in x.items() if "chosen" in k}
        preference_loss(**{**x, **empty}, cfg=PRESET_CONFIGS["rpo_unpaired"])


# ------------------------------------------------------------------------------ KTO


def kto_batch(b: int, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda n: -torch.rand(n, generator=generator, dtype=torch.float64) * 30 - 1  # noqa: E731
    desirable = torch.arange(b) % 3 != 1
    return rand(b), rand(b), desirable, rand(k), rand(k)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_the_equation(weights):
    policy, reference, desirable, policy_kl, reference_kl = kto_batch(7, 7, seed=4)
    cfg = loss_config("kto", beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    loss, rewards, kl = kto_loss(policy, reference, desirable, policy_kl, reference_kl, cfg)
    z0 = max(0.0, sum(float(p - r) for p, r in zip(policy_kl, reference_kl, strict=True)) / 7)
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [
        weights[0] * (1 - sigmoid(0.1 * (float(p - r) - z0))) if d else weights[1] * (1 - sigmoid(0.1 * (z0 - float(p - r))))
        for p, r, d in zip(policy, reference, desirable, strict=True)
    ]
    assert float(loss) == pytest.approx(sum(expected) / 7, rel=1e-12)
    assert float(kl) == pytest.approx(z0)
    torch.testing.assert_close(rewards, 0.1 * (policy - reference))


def test_kto_reference_point_is_detached_and_clamped():
    policy, reference, desirable, policy_kl, reference_kl = kto_batch(4, 3, seed=5)
    policy_kl = (reference_kl + 2.0).requires_grad_()
    loss, _, kl = kto_loss(policy.requires_grad_(), reference, desirable, policy_kl, reference_kl, loss_config("kto", beta=0.1))
    loss.backward()
    assert policy_kl.grad is None and float(kl) == pytest.approx(2.0)
    _, _, kl = kto_loss(policy, reference, desirable, reference_kl - 1.0, reference_kl, loss_config("kto", beta=0.1))
    assert float(kl) == 0.0


def trl_outputs(totals: torch.Tensor, lengths: torch.Tensor):
    """Per-token log-probs that sum to `totals` over completion masks of `lengths` (TRL's layout)."""
    width = int(lengths.max()) + 2
    completion_mask = (torch.arange(width) >= 1) & (torch.arange(width) < lengths.unsqueeze(1) + 1)
    per_token = completion_mask[:, 1:].double() * (totals / lengths).unsqueeze(1)
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    return outputs, completion_mask.long()


def test_kto_parity_with_trl():
    policy, reference, desirable, policy_kl, reference_kl = kto_batch(6, 6, seed=9)
    lengths = torch.randint(1, 9, (6,), generator=torch.Generator().manual_seed(1))
    outputs, completion_mask = trl_outputs(policy, lengths)
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, calculate_KL=True, precompute_ref_logps=True,
        aux_loss_enabled=False, loss_type="kto", beta=0.2, desirable_weight=1.0, undesirable_weight=1.5,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: policy_kl,
    )
    inputs = {
        "input_ids": torch.ones_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask, "label": desirable, "ref_logps": reference, "ref_KL_logps": reference_kl,
    }
    theirs = KTOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    cfg = loss_config("kto", beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    ours, rewards, kl = kto_loss(policy, reference, desirable, policy_kl, reference_kl, cfg)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
    assert float(kl) == pytest.approx(trainer._metrics["train"]["kl"][0], rel=1e-9)
    assert float(rewards[desirable].mean()) == pytest.approx(trainer._metrics["train"]["rewards/chosen"][0], rel=1e-9)


@pytest.mark.parametrize(("beta", "gamma_beta_ratio"), [(10.0, 0.3), (2.0, 0.5)])
def test_simpo_parity_with_trl_cpo(beta, gamma_beta_ratio):
    x = batch(5, 5, seed=12)
    cfg = loss_config("simpo", beta=beta, gamma_beta_ratio=gamma_beta_ratio)
    ours, chosen_rewards, rejected_rewards = preference_loss(**x, cfg=cfg)
    trainer = SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma_beta_ratio * beta, label_smoothing=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    average_chosen = x["policy_chosen_logps"] / x["chosen_lengths"]  # CPO's simpo uses per-token averages
    average_rejected = x["policy_rejected_logps"] / x["rejected_lengths"]
    losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, average_chosen, average_rejected)
    assert float(ours) == pytest.approx(float(losses.mean()), rel=1e-10)
    torch.testing.assert_close(chosen_rewards, trl_chosen)
    torch.testing.assert_close(rejected_rewards, trl_rejected)


GROUPED = [("rpo", "paper"), ("rpo_uniform", "paper"), ("rpo_uniform", "official"), ("rpo_diagonal", "paper"),
           ("rpo_diagonal", "official"), ("rpo_simpo", "paper")]


@pytest.mark.parametrize(("name", "compat"), GROUPED)
@pytest.mark.parametrize("with_margin", [False, True])
def test_groups_of_8_over_64_pairs_are_eight_separate_losses_averaged(name, compat, with_margin):
    """The papers' per-GPU matrices: 64 pairs on 8 GPUs are eight 8 x 8 losses, averaged over GPUs."""
    cfg = {**PRESET_CONFIGS[name], "compat": compat, **({"sr_lambda": 0.5, "sr_delta": "naive"} if with_margin else {})}
    x = batch(64, 64, seed=11)
    margin = torch.linspace(-1, 1, 64, dtype=torch.float64) if with_margin else None
    leaves = {key: x[key].clone().requires_grad_() for key in ("policy_chosen_logps", "policy_rejected_logps")}
    group = torch.arange(64) // 8
    grouped = preference_loss(**{**x, **leaves}, cfg=cfg, margin=margin, groups=(group, group))[0]
    grouped.backward()
    separate_leaves = {key: x[key].clone().requires_grad_() for key in leaves}
    parts = []
    for k in range(8):
        part = slice(8 * k, 8 * k + 8)
        inputs = {key: value[part] for key, value in {**x, **separate_leaves}.items()}
        parts.append(preference_loss(**inputs, cfg=cfg, margin=None if margin is None else margin[part])[0])
    separate = torch.stack(parts).mean()
    separate.backward()
    assert grouped.item() == pytest.approx(separate.item(), rel=1e-12)
    for key in leaves:
        torch.testing.assert_close(leaves[key].grad, separate_leaves[key].grad, rtol=1e-12, atol=1e-15)
    whole = preference_loss(**x, cfg=cfg, margin=margin)[0]
    assert abs(float(whole) - grouped.item()) > 1e-6  # one 64 x 64 matrix is another loss
    one_group = torch.zeros(64, dtype=torch.long)
    assert float(preference_loss(**x, cfg=cfg, margin=margin, groups=(one_group, one_group))[0]) == pytest.approx(float(whole), rel=1e-12)


def test_unpaired_groups_and_a_group_with_one_side_only():
    cfg = PRESET_CONFIGS["rpo_unpaired"]
    x = batch(5, 7, seed=2)
    chosen_groups, rejected_groups = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1, 1])
    grouped = preference_loss(**x, cfg=cfg, groups=(chosen_groups, rejected_groups))[0]
    first = preference_loss(**{k: (v[:2] if "chosen" in k else v[:3]) for k, v in x.items()}, cfg=cfg)[0]
    second = preference_loss(**{k: (v[2:] if "chosen" in k else v[3:]) for k, v in x.items()}, cfg=cfg)[0]
    assert float(grouped) == pytest.approx((float(first) + float(second)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="contrast group 2 has 0 chosen and 1 rejected responses; a group needs both"):
        preference_loss(**x, cfg=cfg, groups=(chosen_groups, torch.tensor([0, 0, 0, 1, 1, 1, 2])))

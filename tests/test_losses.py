"""Losses against the papers' equations (by hand, float64) and against TRL on identical inputs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer

from tests.conftest import loss_config
from trainers.losses import preference_loss, sft_loss


def random_logps(n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: -torch.rand(n, generator=generator, dtype=torch.float64) * 40 - 1  # noqa: E731
    return {
        "policy_chosen_logps": draw(),
        "policy_rejected_logps": draw(),
        "reference_chosen_logps": draw(),
        "reference_rejected_logps": draw(),
        "chosen_lengths": torch.randint(1, 30, (n,), generator=generator),
        "rejected_lengths": torch.randint(1, 30, (n,), generator=generator),
    }


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_matches_equation(n, beta, smoothing):
    x = random_logps(n, seed=n)
    cfg = loss_config("dpo", beta=beta, label_smoothing=smoothing)
    loss, chosen_rewards, rejected_rewards = preference_loss(**x, cfg=cfg)
    expected = 0.0
    for i in range(n):
        h = (x["policy_chosen_logps"][i] - x["reference_chosen_logps"][i]) - (
            x["policy_rejected_logps"][i] - x["reference_rejected_logps"][i]
        )
        h = float(h)
        expected += -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
        assert float(chosen_rewards[i]) == pytest.approx(beta * float(x["policy_chosen_logps"][i] - x["reference_chosen_logps"][i]))
        assert float(rejected_rewards[i]) == pytest.approx(
            beta * float(x["policy_rejected_logps"][i] - x["reference_rejected_logps"][i])
        )
    assert float(loss) == pytest.approx(expected / n, rel=1e-12)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_ipo_matches_equation_with_per_token_averages(n, beta):
    x = random_logps(n, seed=10 + n)
    loss, chosen_rewards, _ = preference_loss(**x, cfg=loss_config("ipo", beta=beta))
    expected = 0.0
    for i in range(n):
        chosen = float(x["policy_chosen_logps"][i] - x["reference_chosen_logps"][i]) / int(x["chosen_lengths"][i])
        rejected = float(x["policy_rejected_logps"][i] - x["reference_rejected_logps"][i]) / int(x["rejected_lengths"][i])
        expected += (chosen - rejected - 1 / (2 * beta)) ** 2
        assert float(chosen_rewards[i]) == pytest.approx(beta * chosen)
    assert float(loss) == pytest.approx(expected / n, rel=1e-12)


@pytest.mark.parametrize("n", [1, 4])
def test_ipo_sum_matches_equation_with_summed_log_probs(n):
    """`ipo_sum`, the RPO papers' IPO baseline: h summed over each response, no length in it."""
    x = random_logps(n, seed=20 + n)
    loss, chosen_rewards, _ = preference_loss(**x, cfg=loss_config("ipo_sum", beta=0.5))
    expected = 0.0
    for i in range(n):
        chosen = float(x["policy_chosen_logps"][i] - x["reference_chosen_logps"][i])
        rejected = float(x["policy_rejected_logps"][i] - x["reference_rejected_logps"][i])
        expected += (chosen - rejected - 1 / (2 * 0.5)) ** 2
        assert float(chosen_rewards[i]) == pytest.approx(0.5 * chosen)
    assert float(loss) == pytest.approx(expected / n, rel=1e-12)


def test_sft_loss_is_token_mean_nll():
    logps = torch.tensor([-6.0, -2.0], dtype=torch.float64)
    lengths = torch.tensor([3, 1])
    assert float(sft_loss(logps, lengths)) == pytest.approx(8.0 / 4)


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_gradients_match_finite_differences(name):
    x = random_logps(4, seed=3)
    policy = (x.pop("policy_chosen_logps").requires_grad_(), x.pop("policy_rejected_logps").requires_grad_())
    cfg = loss_config(name, beta=0.3, label_smoothing=0.1 if name == "dpo" else 0.0)  # smoothing is of the sigmoid link
    assert torch.autograd.gradcheck(lambda c, r: preference_loss(c, r, cfg=cfg, **x)[0], policy)


def test_bad_inputs_get_clear_errors():
    x = random_logps(3, seed=0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(**{**x, "chosen_lengths": None}, cfg=loss_config("ipo", beta=0.1))
    with pytest.raises(ValueError, match="loss.kind: missing, choose one of sft, contrast, kto"):
        preference_loss(**x, cfg={"name": "nope", "beta": 0.1})
    with pytest.raises(ValueError, match="loss.beta=None: give a number"):
        preference_loss(**x, cfg=loss_config("dpo", beta=None))
    with pytest.raises(ValueError, match="loss.beta=0: out of range"):
        preference_loss(**x, cfg=loss_config("ipo", beta=0))
    with pytest.raises(ValueError, match="2 chosen and 3 rejected"):
        two_chosen = {k: v[:2] for k, v in x.items() if "chosen" in k}
        preference_loss(**{**x, **two_chosen}, cfg=loss_config("dpo", beta=0.1))


# ------------------------------------------------------------------------------ TRL parity


def trl_loss(loss_type: str, beta: float, x: dict[str, torch.Tensor]) -> tuple[float, dict]:
    """Run TRL's own DPOTrainer._compute_loss on a batch whose log-probs are exactly `x`.

    A stand-in model returns per-token log-probs that sum to the given sequence log-probs over
    completion masks of the given lengths; reference log-probs enter as precomputed inputs.
    """
    lengths = torch.cat([x["chosen_lengths"], x["rejected_lengths"]])
    width = int(lengths.max()) + 2
    completion_mask = (torch.arange(width) >= 1) & (torch.arange(width) < lengths.unsqueeze(1) + 1)
    shift_mask = completion_mask[:, 1:].double()
    totals = torch.cat([x["policy_chosen_logps"], x["policy_rejected_logps"]])
    per_token = shift_mask * (totals / lengths).unsqueeze(1)
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(len(lengths), width, dtype=torch.long),
        "attention_mask": torch.ones(len(lengths), width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": x["reference_chosen_logps"],
        "ref_rejected_logps": x["reference_rejected_logps"],
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return float(loss), trainer._metrics["train"]


@pytest.mark.parametrize(("loss_type", "name"), [("sigmoid", "dpo"), ("ipo", "ipo")])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_parity_with_trl(loss_type, name, beta):
    x = random_logps(6, seed=42)
    ours, chosen_rewards, rejected_rewards = preference_loss(**x, cfg=loss_config(name, beta=beta))
    theirs, metrics = trl_loss(loss_type, beta, x)
    assert float(ours) == pytest.approx(theirs, rel=1e-9)
    if name == "dpo":  # TRL reports summed-log-prob rewards for every loss type
        assert float(chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"][0], rel=1e-9)
        assert float((chosen_rewards > rejected_rewards).float().mean()) == metrics["rewards/accuracies"][0]

"""Losses as pure tensor functions: no model, no data, no trainer.

Every pairwise method is `link(h - margin)` of the difference `h` between the reward of the
chosen and of the rejected response of the same prompt (DPO, IPO). The loss is selected by
the composed `loss` config node (`config/loss/*.yaml`); adding a method means one function
here and one YAML file there.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def _require(cfg: Mapping, key: str) -> object:
    if key not in cfg or cfg[key] is None:
        raise KeyError(f"loss config {cfg.get('name', '?')!r} needs the key loss.{key}")
    return cfg[key]


def _per_token(logps: torch.Tensor, lengths: torch.Tensor | None, side: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"this loss averages log-probs per token: pass {side}_lengths")
    return logps / lengths.clamp(min=1)


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per response token over the whole batch."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    cfg: Mapping,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of a batch of M chosen and N rejected responses, and their rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed response log-probs, [M] and [N].
        reference_chosen_logps, reference_rejected_logps: the same under the frozen reference.
        cfg: the `loss` config node: `name` (`dpo`, `ipo`), `beta`, `label_smoothing` (DPO).
        chosen_lengths, rejected_lengths: response token counts (IPO averages per token).

    Returns:
        The batch-mean loss and the rewards `beta * (log pi - log pi_ref)` of each response
        (IPO: of the per-token averages, as the IPO authors and TRL report them).
    """
    name = cfg["name"]
    beta = float(_require(cfg, "beta"))
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(f"loss {name!r} compares against a reference model: pass reference log-probs")
    if name == "ipo":
        policy_chosen_logps = _per_token(policy_chosen_logps, chosen_lengths, "chosen")
        reference_chosen_logps = _per_token(reference_chosen_logps, chosen_lengths, "chosen")
        policy_rejected_logps = _per_token(policy_rejected_logps, rejected_lengths, "rejected")
        reference_rejected_logps = _per_token(reference_rejected_logps, rejected_lengths, "rejected")
    if policy_chosen_logps.shape != policy_rejected_logps.shape:
        raise ValueError(
            f"loss {name!r} pairs chosen and rejected responses of the same prompt: got "
            f"{policy_chosen_logps.shape[0]} chosen and {policy_rejected_logps.shape[0]} rejected"
        )
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    h = chosen_log_ratio - rejected_log_ratio
    if name == "dpo":
        smoothing = float(cfg.get("label_smoothing", 0.0))
        losses = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    elif name == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss.name {name!r}: preference_loss knows 'dpo' and 'ipo'")
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return losses.mean(), chosen_rewards, rejected_rewards

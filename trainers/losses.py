"""Losses as pure tensor functions: no model, no data, no trainer.

Every pairwise method is one function of a contrast matrix. With M chosen and N rejected
responses and a reward r per response,

    S[i, j] = r_chosen[i] - r_rejected[j]                          (M x N)
    loss    = mean over the counted (i, j) of link(W[i, j] * S[i, j] - shift[i])

- reward: `log_ratio` beta * (log pi - log pi_ref); `mean_log_ratio` the same per token (IPO);
  `length_normalized` beta / |y| * log pi (SimPO, no reference)
- weighting W: `diagonal` (only the same-prompt pairs i = j count: DPO, IPO, SimPO),
  `uniform` (1/N), `diagonal_emphasis` (alpha on the diagonal, (1 - alpha)/(M - 1) off it),
  `embedding` (RPO: softmax over j of -cosine_distance(e_chosen[i], e_rejected[j]) / tau)
- shift: `gamma_beta_ratio * beta` (SimPO's gamma) plus `sr_lambda * margin` (self-refinement)
- link: `sigmoid` -log sigmoid(z) (with DPO's `label_smoothing`); `ipo` (z / beta - 1/(2 beta))^2,
  the shift entering on the log-ratio scale

DPO, IPO, SimPO, RPO and their combinations are presets of this one function (`PRESETS`);
the keys of the `loss` config override a preset. KTO, the one non-contrast loss, is `kto_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

# What each loss name means when its config leaves a key out; the YAML files spell them out.
PRESETS: dict[str, dict[str, object]] = {
    "dpo": {"weighting": "diagonal", "link": "sigmoid", "reward": "log_ratio"},
    "ipo": {"weighting": "diagonal", "link": "ipo", "reward": "mean_log_ratio"},
    "simpo": {"weighting": "diagonal", "link": "sigmoid", "reward": "length_normalized"},
    "rpo": {"weighting": "embedding", "link": "sigmoid", "reward": "log_ratio"},
    "rpo_unpaired": {"weighting": "embedding", "link": "sigmoid", "reward": "log_ratio"},
    "rpo_uniform": {"weighting": "uniform", "link": "sigmoid", "reward": "log_ratio"},
    "rpo_diagonal": {"weighting": "diagonal_emphasis", "link": "sigmoid", "reward": "log_ratio"},
    "rpo_simpo": {"weighting": "embedding", "link": "sigmoid", "reward": "length_normalized"},
    "sr_dpo": {"weighting": "diagonal", "link": "sigmoid", "reward": "log_ratio"},
    "sr_ipo": {"weighting": "diagonal", "link": "ipo", "reward": "mean_log_ratio"},
}
WEIGHTINGS = ("diagonal", "uniform", "diagonal_emphasis", "embedding")
LINKS = ("sigmoid", "ipo")
REWARDS = ("log_ratio", "mean_log_ratio", "length_normalized")


def _require(cfg: Mapping, key: str) -> object:
    if cfg.get(key) is None:
        raise KeyError(f"loss config {cfg.get('name', '?')!r} needs the key loss.{key}")
    return cfg[key]


def loss_setting(cfg: Mapping, key: str, allowed: tuple[str, ...]) -> str:
    """A structural key of the loss (`weighting`, `link`, `reward`): the config's, else the preset's."""
    preset = PRESETS.get(cfg["name"], {})
    value = cfg.get(key) or preset.get(key)
    if value not in allowed:
        raise ValueError(f"loss.{key}={value!r} for loss {cfg['name']!r}: choose one of {', '.join(allowed)}")
    return value


def _per_token(logps: torch.Tensor, lengths: torch.Tensor | None, side: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"this loss averages log-probs per token: pass {side}_lengths")
    return logps / lengths.clamp(min=1)


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per response token over the whole batch."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def rewards(
    kind: str, beta: float, policy_logps: torch.Tensor, reference_logps: torch.Tensor | None, lengths: torch.Tensor | None, side: str
) -> torch.Tensor:
    """The implicit reward of each response (with gradient)."""
    if kind == "length_normalized":
        return beta * _per_token(policy_logps, lengths, side)
    if reference_logps is None:
        raise ValueError(f"reward {kind!r} compares against a reference model: pass reference log-probs")
    if kind == "mean_log_ratio":
        return beta * _per_token(policy_logps - reference_logps, lengths, side)
    return beta * (policy_logps - reference_logps)


def cosine_distance(chosen_embeddings: torch.Tensor, rejected_embeddings: torch.Tensor) -> torch.Tensor:
    """[M, N] 1 - cos(e_chosen[i], e_rejected[j])."""
    return 1 - F.normalize(chosen_embeddings, dim=-1) @ F.normalize(rejected_embeddings, dim=-1).T


def contrast_weights(
    weighting: str,
    cfg: Mapping,
    contrast: torch.Tensor,
    chosen_embeddings: torch.Tensor | None,
    rejected_embeddings: torch.Tensor | None,
) -> torch.Tensor:
    """The [M, N] weights W of a weighting (not used by `diagonal`), in the contrast's dtype.

    W carries no gradient: it depends on the prompts only (embeddings are inputs, not parameters).
    """
    rows, columns = contrast.shape
    official = cfg.get("compat", "paper") == "official"
    if weighting == "uniform":
        return torch.full_like(contrast, 1.0 if official else 1.0 / columns)
    if weighting == "diagonal_emphasis":
        if rows != columns:
            raise ValueError(f"weighting 'diagonal_emphasis' needs paired data (M = N), got {rows} chosen and {columns} rejected")
        alpha = float(_require(cfg, "alpha"))
        off_diagonal = (1 - alpha) / (rows - 1) if rows > 1 else 0.0
        return torch.full_like(contrast, off_diagonal).fill_diagonal_(alpha)
    if chosen_embeddings is None or rejected_embeddings is None:
        raise ValueError("weighting 'embedding' (RPO) needs chosen_embeddings and rejected_embeddings")
    tau = float(_require(cfg, "tau"))
    dtype = torch.promote_types(contrast.dtype, torch.float32)
    distance = cosine_distance(chosen_embeddings.to(contrast.device, dtype), rejected_embeddings.to(contrast.device, dtype))
    return torch.softmax(-distance / tau, dim=1).to(contrast.dtype)


def link_losses(link: str, logits: torch.Tensor, shift: torch.Tensor, beta: float, cfg: Mapping) -> torch.Tensor:
    """Per-entry losses of (weighted) reward differences `logits`, shifted by the margin."""
    if link == "ipo":
        return (logits / beta - shift - 1 / (2 * beta)) ** 2
    z = logits - shift
    smoothing = float(cfg.get("label_smoothing") or 0.0)
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def margin_shift(cfg: Mapping, beta: float, link: str, margin: torch.Tensor | None, rows: int) -> torch.Tensor:
    """[M, 1] what is subtracted inside the link: SimPO's gamma and the self-refinement margin.

    For the sigmoid link the shift is on the reward scale (beta * h - gamma - lambda * Delta);
    for the IPO link on the log-ratio scale (h - lambda * Delta - 1/(2 beta)), as Sr-IPO writes it.
    """
    shift = torch.zeros(rows, 1, dtype=torch.float64)  # cast to the rewards' dtype by the caller
    gamma_beta_ratio = cfg.get("gamma_beta_ratio")
    if gamma_beta_ratio:
        gamma = float(gamma_beta_ratio) * beta
        shift = shift + (gamma / beta if link == "ipo" else gamma)
    if margin is not None:
        if margin.shape != (rows,):
            raise ValueError(f"margin must have one value per chosen response ({rows}), got shape {tuple(margin.shape)}")
        shift = shift.to(margin.device) + float(_require(cfg, "sr_lambda")) * margin.detach().unsqueeze(1)
    return shift


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    cfg: Mapping,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    chosen_embeddings: torch.Tensor | None = None,
    rejected_embeddings: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of a batch of M chosen and N rejected responses, and their rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed response log-probs, [M] and [N].
        reference_chosen_logps, reference_rejected_logps: the same under the frozen reference
            (None for the reference-free `length_normalized` reward).
        cfg: the `loss` config node: `name`, `beta`, and optionally `weighting`, `link`, `reward`
            (defaults from `PRESETS[name]`), `tau`, `alpha`, `gamma_beta_ratio`,
            `label_smoothing`, `sr_lambda`, `compat` (`paper` or `official`).
        chosen_lengths, rejected_lengths: response token counts, [M] and [N].
        chosen_embeddings, rejected_embeddings: prompt embeddings, [M, d] and [N, d] (RPO).
        margin: [M] a detached margin per chosen response, scaled by `sr_lambda` (self-refinement).

    Returns:
        The scalar loss and the (detached) rewards of the chosen [M] and rejected [N] responses.
    """
    beta = float(_require(cfg, "beta"))
    weighting = loss_setting(cfg, "weighting", WEIGHTINGS)
    link = loss_setting(cfg, "link", LINKS)
    reward = loss_setting(cfg, "reward", REWARDS)
    chosen_rewards = rewards(reward, beta, policy_chosen_logps, reference_chosen_logps, chosen_lengths, "chosen")
    rejected_rewards = rewards(reward, beta, policy_rejected_logps, reference_rejected_logps, rejected_lengths, "rejected")
    rows, columns = len(chosen_rewards), len(rejected_rewards)
    if rows == 0 or columns == 0:
        raise ValueError(f"a contrast loss needs chosen and rejected responses: got {rows} chosen and {columns} rejected")
    shift = margin_shift(cfg, beta, link, margin, rows).to(chosen_rewards)
    if weighting == "diagonal":
        if rows != columns:
            raise ValueError(
                f"loss {cfg['name']!r} pairs chosen and rejected responses of the same prompt: got {rows} chosen and {columns} rejected"
            )
        losses = link_losses(link, (chosen_rewards - rejected_rewards).unsqueeze(1), shift, beta, cfg)
    else:
        contrast = chosen_rewards.unsqueeze(1) - rejected_rewards.unsqueeze(0)
        weights = contrast_weights(weighting, cfg, contrast, chosen_embeddings, rejected_embeddings)
        if weighting == "diagonal_emphasis" and cfg.get("compat", "paper") == "official":
            # the official code weights each row's pair losses (alpha on the diagonal) and sums them
            losses = (weights * link_losses(link, contrast, shift, beta, cfg)).sum(dim=1)
        else:
            losses = link_losses(link, weights * contrast, shift, beta, cfg)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    cfg: Mapping,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024) on B responses judged alone.

    With r = log pi(y|x) - log pi_ref(y|x) and the reference point
    z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over K mismatched pairs (detached):
    desirable: w_d * (1 - sigmoid(beta (r - z0))); undesirable: w_u * (1 - sigmoid(beta (z0 - r))).

    Returns the mean of the B weighted losses, the rewards beta * r [B] and z0.
    """
    beta = float(_require(cfg, "beta"))
    if len(policy_kl_logps) == 0:
        raise ValueError("kto_loss needs at least one mismatched (prompt, response) pair for its KL reference point")
    kl = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
    log_ratio = policy_logps - reference_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        float(cfg.get("desirable_weight", 1.0)) * (1 - torch.sigmoid(beta * (log_ratio - kl))),
        float(cfg.get("undesirable_weight", 1.0)) * (1 - torch.sigmoid(beta * (kl - log_ratio))),
    )
    return losses.mean(), beta * log_ratio.detach(), kl

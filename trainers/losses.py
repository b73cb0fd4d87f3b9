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

DPO, IPO, SimPO, RPO and their combinations are settings of this one function, spelled out in
`config/loss/*.yaml` (the one place that says what each name means). KTO, the one non-contrast
loss, is `kto_loss`. `LossSpec` checks a loss config once and answers what the loss needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from utils import Checker, ConfigError

KINDS = ("sft", "contrast", "kto")
WEIGHTINGS = ("diagonal", "uniform", "diagonal_emphasis", "embedding")
LINKS = ("sigmoid", "ipo")
REWARDS = ("log_ratio", "mean_log_ratio", "length_normalized")
SR_DELTAS = ("refined", "naive")
COMPATS = ("paper", "official")
EMBEDDING_INPUTS = ("prompt", "prompt_response")


@dataclass(frozen=True)
class LossSpec:
    """A loss config, checked once: what the loss is and what it needs.

    `kind` is `sft` (NLL of the chosen responses), `contrast` (`preference_loss`: DPO, IPO, SimPO,
    RPO, self-refinement) or `kto` (`kto_loss`). Every question the trainer asks about the loss
    (does it need a reference, embeddings, pairs, an augmented pass?) is a property of the spec.
    """

    name: str
    kind: str
    beta: float = 0.0
    weighting: str = "diagonal"
    link: str = "sigmoid"
    reward: str = "log_ratio"
    paired: bool = True
    tau: float = 0.0
    alpha: float = 0.0
    gamma_beta_ratio: float = 0.0
    label_smoothing: float = 0.0
    sr_lambda: float = 0.0
    sr_delta: str = "refined"
    sr_prompt: str = ""
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    compat: str = "paper"
    embedding_model: str = ""
    embedding_input: str = "prompt"
    contrast_group: int | None = None

    @classmethod
    def of(cls, cfg: Mapping | LossSpec) -> LossSpec:
        """The spec of a `loss` config node (a spec is returned as it is); `ConfigError` lists every problem."""
        if isinstance(cfg, LossSpec):
            return cfg
        spec, problems = cls.checked(cfg)
        if problems:
            raise ConfigError("\n".join(problems))
        return spec

    @classmethod
    def checked(cls, cfg: Mapping) -> tuple[LossSpec, list[str]]:
        """The spec and one line per problem of the config (types, choices, ranges, combinations)."""
        check = Checker(cfg, prefix="loss.")
        name, kind = str(cfg.get("name")), check.choice("kind", KINDS)
        if kind in ("sft", None):
            return cls(name, str(kind)), check.problems
        values: dict[str, object] = {"beta": check.number("beta", 0.0, open_low=True)}
        if kind == "kto":
            values["desirable_weight"] = check.number("desirable_weight", 0.0, open_low=True)
            values["undesirable_weight"] = check.number("undesirable_weight", 0.0, open_low=True)
            if check.flag("paired"):
                check.problems.append("loss.paired=true: KTO judges responses one at a time, it needs loss.paired=false")
            return cls(name, kind, paired=False, **values), check.problems
        values.update(
            weighting=check.choice("weighting", WEIGHTINGS),
            link=check.choice("link", LINKS),
            reward=check.choice("reward", REWARDS),
            paired=check.flag("paired"),
            compat=check.choice("compat", COMPATS, default="paper"),
        )
        optional = {"gamma_beta_ratio": (0.0,), "label_smoothing": (0.0, 0.5), "sr_lambda": (0.0,)}
        for key, bounds in optional.items():
            if cfg.get(key) is not None:
                values[key] = check.number(key, *bounds)
        if values["weighting"] == "embedding":
            values["tau"] = check.number("tau", 0.0, open_low=True)
            values["embedding_model"] = str(check.value("embedding.model", None) or "")
            if not values["embedding_model"]:
                check.problems.append("loss.embedding.model: name the sentence-embedding model of RPO's weights")
            values["embedding_input"] = check.choice("embedding.input", EMBEDDING_INPUTS)
        if values["link"] == "ipo" and values.get("label_smoothing"):
            check.fail("label_smoothing", "it smooths the sigmoid link, this loss has link=ipo")
        if values["weighting"] == "diagonal_emphasis":
            values["alpha"] = check.number("alpha", 0.0, 1.0)
        if values["weighting"] not in ("diagonal", None) and cfg.get("contrast_group") is not None:
            values["contrast_group"] = check.whole("contrast_group", optional=True)
        weighting = values["weighting"]
        if weighting in ("diagonal", "diagonal_emphasis") and values["paired"] is False:
            check.problems.append(f"loss.weighting={weighting} contrasts the two responses of one prompt: it needs loss.paired=true")
        if values.get("sr_lambda"):
            values["sr_delta"] = check.choice("sr_delta", SR_DELTAS)
            values["sr_prompt"] = str(cfg.get("sr_prompt") or "")
            if values["paired"] is False:
                check.fail("sr_lambda", "self-refinement needs pairs: loss.paired=true")
            if values["sr_delta"] == "refined" and not values["sr_prompt"].strip():
                check.problems.append("loss.sr_prompt: sr_delta=refined needs the prompt p that augments each query")
        return cls(name, kind, **values), check.problems

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares against the frozen reference (all but SFT and SimPO's reward)."""
        return self.kind == "kto" or (self.kind == "contrast" and self.reward != "length_normalized")

    @property
    def needs_embeddings(self) -> bool:
        return self.kind == "contrast" and self.weighting == "embedding"

    @property
    def self_refined(self) -> bool:
        return self.kind == "contrast" and self.sr_lambda > 0

    @property
    def refines_on_augmented(self) -> bool:
        """Self-refinement's Delta comes from an extra pass on the augmented query p + x."""
        return self.self_refined and self.sr_delta == "refined"

    @property
    def contrasts_across_examples(self) -> bool:
        """Whether the loss compares responses of different examples (RPO's matrix)."""
        return self.kind == "contrast" and self.weighting != "diagonal"

    def as_dict(self) -> dict[str, object]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


SFT = LossSpec("sft", "sft")


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
    spec: LossSpec,
    contrast: torch.Tensor,
    chosen_embeddings: torch.Tensor | None,
    rejected_embeddings: torch.Tensor | None,
) -> torch.Tensor:
    """The [M, N] weights W of a weighting (not used by `diagonal`), in the contrast's dtype.

    W carries no gradient: it depends on the prompts only (embeddings are inputs, not parameters).
    """
    rows, columns = contrast.shape
    official = spec.compat == "official"
    if spec.weighting == "uniform":
        return torch.full_like(contrast, 1.0 if official else 1.0 / columns)
    if spec.weighting == "diagonal_emphasis":
        if rows != columns:
            raise ValueError(f"weighting 'diagonal_emphasis' needs paired data (M = N), got {rows} chosen and {columns} rejected")
        off_diagonal = (1 - spec.alpha) / (rows - 1) if rows > 1 else 0.0
        return torch.full_like(contrast, off_diagonal).fill_diagonal_(spec.alpha)
    if chosen_embeddings is None or rejected_embeddings is None:
        raise ValueError("weighting 'embedding' (RPO) needs chosen_embeddings and rejected_embeddings")
    dtype = torch.promote_types(contrast.dtype, torch.float32)
    distance = cosine_distance(chosen_embeddings.to(contrast.device, dtype), rejected_embeddings.to(contrast.device, dtype))
    return torch.softmax(-distance / spec.tau, dim=1).to(contrast.dtype)


def link_losses(spec: LossSpec, logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-entry losses of (weighted) reward differences `logits`, shifted by the margin."""
    if spec.link == "ipo":
        return (logits / spec.beta - shift - 1 / (2 * spec.beta)) ** 2
    z = logits - shift
    smoothing = spec.label_smoothing
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def margin_shift(spec: LossSpec, margin: torch.Tensor | None, rows: int) -> torch.Tensor:
    """[M, 1] what is subtracted inside the link: SimPO's gamma and the self-refinement margin.

    For the sigmoid link the shift is on the reward scale (beta * h - gamma - lambda * Delta);
    for the IPO link on the log-ratio scale (h - lambda * Delta - 1/(2 beta)), as Sr-IPO writes it.
    """
    shift = torch.zeros(rows, 1, dtype=torch.float64)  # cast to the rewards' dtype by the caller
    if spec.gamma_beta_ratio:
        gamma = spec.gamma_beta_ratio * spec.beta
        shift = shift + (gamma / spec.beta if spec.link == "ipo" else gamma)
    if margin is not None:
        if margin.shape != (rows,):
            raise ValueError(f"margin must have one value per chosen response ({rows}), got shape {tuple(margin.shape)}")
        shift = shift.to(margin.device) + spec.sr_lambda * margin.detach().unsqueeze(1)
    return shift


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    cfg: Mapping | LossSpec,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    chosen_embeddings: torch.Tensor | None = None,
    rejected_embeddings: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of a batch of M chosen and N rejected responses, and their rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: summed response log-probs, [M] and [N].
        reference_chosen_logps, reference_rejected_logps: the same under the frozen reference
            (None for the reference-free `length_normalized` reward).
        cfg: the `loss` config node (`config/loss/*.yaml`: `kind: contrast`, `beta`, `weighting`,
            `link`, `reward`, `paired` and the keys they need) or its `LossSpec`.
        chosen_lengths, rejected_lengths: response token counts, [M] and [N].
        chosen_embeddings, rejected_embeddings: prompt embeddings, [M, d] and [N, d] (RPO).
        margin: [M] a detached margin per chosen response, scaled by `sr_lambda` (self-refinement).
        groups: the contrast group of each chosen [M] and rejected [N] response (a weighting that
            contrasts across examples): the matrix is block-diagonal, each group contrasted as
            if it were a batch of its own, and the loss is the mean of the groups' losses (the
            papers' per-GPU matrices, averaged over GPUs). None: one matrix over everything.

    Returns:
        The scalar loss and the (detached) rewards of the chosen [M] and rejected [N] responses.
    """
    spec = LossSpec.of(cfg)
    if spec.kind != "contrast":
        raise ValueError(f"loss {spec.name!r} is not a contrast loss (kind {spec.kind})")
    chosen_rewards = rewards(spec.reward, spec.beta, policy_chosen_logps, reference_chosen_logps, chosen_lengths, "chosen")
    rejected_rewards = rewards(spec.reward, spec.beta, policy_rejected_logps, reference_rejected_logps, rejected_lengths, "rejected")
    rows, columns = len(chosen_rewards), len(rejected_rewards)
    if rows == 0 or columns == 0:
        raise ValueError(f"a contrast loss needs chosen and rejected responses: got {rows} chosen and {columns} rejected")
    shift = margin_shift(spec, margin, rows).to(chosen_rewards)
    if spec.weighting == "diagonal":
        if rows != columns:
            raise ValueError(
                f"loss {spec.name!r} pairs chosen and rejected responses of the same prompt: got {rows} chosen and {columns} rejected"
            )
        losses = link_losses(spec, (chosen_rewards - rejected_rewards).unsqueeze(1), shift)
        loss = losses.mean()
    elif groups is None:
        loss = contrast_loss(spec, chosen_rewards, rejected_rewards, shift, chosen_embeddings, rejected_embeddings)
    else:
        group_losses = []
        for in_rows, in_columns in group_members(groups):
            embeddings = (None, None) if chosen_embeddings is None else (chosen_embeddings[in_rows], rejected_embeddings[in_columns])
            group_losses.append(contrast_loss(spec, chosen_rewards[in_rows], rejected_rewards[in_columns], shift[in_rows], *embeddings))
        loss = torch.stack(group_losses).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def contrast_loss(
    spec: LossSpec,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    shift: torch.Tensor,
    chosen_embeddings: torch.Tensor | None,
    rejected_embeddings: torch.Tensor | None,
) -> torch.Tensor:
    """The mean loss of one M x N contrast matrix of a weighting other than `diagonal`."""
    contrast = chosen_rewards.unsqueeze(1) - rejected_rewards.unsqueeze(0)
    weights = contrast_weights(spec, contrast, chosen_embeddings, rejected_embeddings)
    if spec.weighting == "diagonal_emphasis" and spec.compat == "official":
        # the official code weights each row's pair losses (alpha on the diagonal) and sums them
        return (weights * link_losses(spec, contrast, shift)).sum(dim=1).mean()
    return link_losses(spec, weights * contrast, shift).mean()


def group_members(groups: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(chosen rows, rejected columns) of each contrast group, in the order of the group ids."""
    chosen_groups, rejected_groups = groups
    members = []
    for group in torch.unique(torch.cat([chosen_groups, rejected_groups])).tolist():
        rows, columns = chosen_groups == group, rejected_groups == group
        if not rows.any() or not columns.any():
            raise ValueError(f"contrast group {group} has {int(rows.sum())} chosen and {int(columns.sum())} rejected responses; "
                             "a group needs both")
        members.append((rows, columns))
    return members


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    cfg: Mapping | LossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024) on B responses judged alone.

    With r = log pi(y|x) - log pi_ref(y|x) and the reference point
    z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))) over K mismatched pairs (detached):
    desirable: w_d * (1 - sigmoid(beta (r - z0))); undesirable: w_u * (1 - sigmoid(beta (z0 - r))).

    Returns the mean of the B weighted losses, the rewards beta * r [B] and z0.
    """
    spec = LossSpec.of(cfg)
    beta = spec.beta
    if len(policy_kl_logps) == 0:
        raise ValueError("kto_loss needs at least one mismatched (prompt, response) pair for its KL reference point")
    kl = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
    log_ratio = policy_logps - reference_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        spec.desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl))),
        spec.undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio))),
    )
    return losses.mean(), beta * log_ratio.detach(), kl

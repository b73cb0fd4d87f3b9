"""The loss the training loop computes, recomputed by hand from scratch: log-probs from a full-vocabulary
forward, each row's own prompt embedding straight from the sentence model, the self-refinement margin
from the augmented sequences, and the RPO equations in float64 loops. The policy is perturbed first,
so that it differs from the reference (rewards and Delta far from zero)."""

from __future__ import annotations

import math

import pytest
import torch
from sentence_transformers import SentenceTransformer

import train
import trainers.basic
from preference_datasets import collate, collate_items, load_datasets
from tests.conftest import build
from tests.test_contrast_losses import weight_by_hand
from trainers.basic import WeightedMeans
from utils import resolve_model_path


def full_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed log-probs of the labelled tokens from the full [tokens, vocab] log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    per_token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * (labels != -100)).sum(-1)


def perturbed(trainer, scale: float = 0.05):
    """Move the policy away from the reference (the cached log-probs stay those of the start)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return trainer


def prompt_embedding(texts: list[str], cache) -> torch.Tensor:
    encoder = SentenceTransformer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2", cache), device="cpu")
    return torch.tensor(encoder.encode(texts), dtype=torch.float64)


def prompt_of(example) -> str:
    return "\n".join(message["content"] for message in example.prompt)


def captured_loss_inputs(monkeypatch) -> dict:
    """What the training loop passes to `preference_loss`, recorded at the call."""
    seen = {}
    original = trainers.basic.preference_loss
    monkeypatch.setattr(trainers.basic, "preference_loss", lambda **kwargs: seen.update(kwargs) or original(**kwargs))
    return seen


def rpo_loss_by_hand(cfg: dict, chosen: list[float], rejected: list[float], weights, shifts: list[float]) -> float:
    """mean_ij link(W_ij S_ij - shift_i), S_ij = chosen_i - rejected_j (rewards); official diagonal
    emphasis weights the per-pair losses instead."""
    smoothing = cfg.get("label_smoothing") or 0.0
    m, n = len(chosen), len(rejected)

    def link(z: float) -> float:
        return -(1 - smoothing) * math.log(1 / (1 + math.exp(-z))) - smoothing * math.log(1 / (1 + math.exp(z)))

    if cfg["weighting"] == "diagonal_emphasis" and cfg.get("compat") == "official":
        rows = [sum(weights[i][j] * link(chosen[i] - rejected[j] - shifts[i]) for j in range(n)) for i in range(m)]
        return sum(rows) / m
    return sum(link(weights[i][j] * (chosen[i] - rejected[j]) - shifts[i]) for i in range(m) for j in range(n)) / (m * n)


def weights_by_hand(cfg: dict, chosen_embeddings, rejected_embeddings, m: int, n: int) -> list[list[float]]:
    """The [M, N] weights of `cfg`'s weighting, each from `test_contrast_losses.weight_by_hand`."""
    embeddings = {"chosen_embeddings": chosen_embeddings, "rejected_embeddings": rejected_embeddings}
    return [[weight_by_hand(cfg, embeddings, i, j, m, n) for j in range(n)] for i in range(m)]


PAIRED_CASES = {
    "rpo, label smoothing": ["loss=rpo", "loss.label_smoothing=0.1"],
    "rpo, prompt_response embeddings": ["loss=rpo", "loss.embedding.input=prompt_response"],
    "rpo_uniform, official": ["loss=rpo_uniform", "loss.compat=official"],
    "rpo_diagonal, official": ["loss=rpo_diagonal", "loss.compat=official"],
    "rpo_diagonal, paper": ["loss=rpo_diagonal"],
    # beta 1: rewards of several nats, where a margin in the wrong row would change the loss (near
    # zero the loss is linear in the shifts and only their sum counts)
    "rpo + self-refinement": ["loss=rpo", "loss.sr_lambda=2.0", "loss.beta=1.0"],
}


@pytest.mark.parametrize("overrides", PAIRED_CASES.values(), ids=PAIRED_CASES.keys())
def test_paired_loop_loss_equals_the_equation_by_hand(make_cfg, tmp_path, shared_cache, monkeypatch, overrides):
    cfg = make_cfg(*overrides, "sft.enabled=false")
    seen = captured_loss_inputs(monkeypatch)
    trainer = perturbed(build(cfg, tmp_path))
    loss_cfg = {**dict(cfg.loss), "weighting": cfg.loss.weighting}
    pairs = train.prepare_examples(cfg, load_datasets(cfg.datasets))["train"]
    indices = [5, 17, 2, 40, 33]
    batch = trainer.make_batch(trainer.train_set, indices)  # the trainer's (packed) layout
    loss, stats = trainer.batch_loss(batch, "train")

    policy = full_logps(trainer.policy, collate([trainer.train_set[i] for i in indices], indices, trainer.pad_id)).view(2, -1)
    reference = trainer.reference_logps["train"][indices].double().T
    chosen, rejected = (cfg.loss.beta * (policy[0] - reference[0])).tolist(), (cfg.loss.beta * (policy[1] - reference[1])).tolist()
    if cfg.loss.embedding.input == "prompt_response":
        chosen_embeddings = prompt_embedding([f"{prompt_of(pairs[i])}\n{pairs[i].chosen}" for i in indices], shared_cache)
        rejected_embeddings = prompt_embedding([f"{prompt_of(pairs[i])}\n{pairs[i].rejected}" for i in indices], shared_cache)
    else:
        chosen_embeddings = rejected_embeddings = prompt_embedding([prompt_of(pairs[i]) for i in indices], shared_cache)
    if loss_cfg["weighting"] == "embedding":  # each row and column its own prompt's (or response's) embedding
        torch.testing.assert_close(seen["chosen_embeddings"].double(), chosen_embeddings, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen["rejected_embeddings"].double(), rejected_embeddings, rtol=1e-4, atol=1e-5)
    weights = weights_by_hand(loss_cfg, chosen_embeddings, rejected_embeddings, 5, 5)
    shifts = [0.0] * 5
    if cfg.loss.sr_lambda:  # Delta_i = beta (log-ratio of y_w - log-ratio of y_l) on p + x, from the policy now
        augmented = collate([trainer.train_set[i].augmented for i in indices], indices, trainer.pad_id)
        on_augmented = full_logps(trainer.policy, augmented).view(2, -1)
        augmented_reference = trainer.reference_logps["train/augmented"][indices].double().T
        ratios = on_augmented - augmented_reference
        delta = (cfg.loss.beta * (ratios[0] - ratios[1])).tolist()
        assert min(map(abs, delta)) > 1e-3  # far from zero: the policy is not the reference
        assert stats["sr/delta_mean"][0] == pytest.approx(sum(delta) / 5, rel=1e-4)
        assert stats["sr/accuracy_augmented"][0] == pytest.approx(sum(d > 0 for d in delta) / 5)
        means = WeightedMeans()
        means.add(stats)
        spread = math.sqrt(sum((d - sum(delta) / 5) ** 2 for d in delta) / 5)  # over the batch (not per micro-batch)
        assert means.result(lambda totals: totals)["sr/delta_std"] == pytest.approx(spread, rel=1e-3)
        shifts = [cfg.loss.sr_lambda * d for d in delta]
    assert min(map(abs, chosen + rejected)) > 1e-4
    assert loss.item() == pytest.approx(rpo_loss_by_hand(loss_cfg, chosen, rejected, weights, shifts), rel=1e-4)
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 5
    assert stats["rewards/accuracy"] == (pytest.approx(wins), 5)


def test_unpaired_loop_rows_get_their_own_prompt_embeddings(make_cfg, tmp_path, shared_cache, monkeypatch):
    """rpo_unpaired: desirable items are the rows, undesirable ones the columns, each weighted by
    the similarity of its own prompt (beta 1: see the self-refinement case above)."""
    cfg = make_cfg("loss=rpo_unpaired", "sft.enabled=false", "loss.beta=1.0")
    seen = captured_loss_inputs(monkeypatch)
    trainer = perturbed(build(cfg, tmp_path))
    items = train.prepare_examples(cfg, load_datasets(cfg.datasets))["train"]
    indices = [8, 30, 51, 3, 12, 44, 61]  # desirable first, as training batches hold them
    # and the other answer of item 8's prompt: one comparison within a prompt
    indices.append(next(j for j, item in enumerate(items) if j != 8 and prompt_of(item) == prompt_of(items[8])
                        and item.desirable != items[8].desirable))
    desirable = [i for i in indices if items[i].desirable]
    undesirable = [i for i in indices if not items[i].desirable]
    assert len(desirable) >= 2 and len(undesirable) >= 2
    indices = desirable + undesirable
    loss, stats = trainer.batch_loss(trainer.make_batch(trainer.train_set, indices), "train")
    padded = collate_items([trainer.train_set[i] for i in indices], indices, trainer.pad_id)
    rewards = (cfg.loss.beta * (full_logps(trainer.policy, padded) - trainer.reference_logps["train"][indices, 0].double())).tolist()
    chosen, rejected = rewards[: len(desirable)], rewards[len(desirable) :]
    chosen_embeddings = prompt_embedding([prompt_of(items[i]) for i in desirable], shared_cache)
    rejected_embeddings = prompt_embedding([prompt_of(items[i]) for i in undesirable], shared_cache)
    torch.testing.assert_close(seen["chosen_embeddings"].double(), chosen_embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["rejected_embeddings"].double(), rejected_embeddings, rtol=1e-4, atol=1e-5)
    loss_cfg = {**dict(cfg.loss), "weighting": "embedding"}
    weights = weights_by_hand(loss_cfg, chosen_embeddings, rejected_embeddings, len(desirable), len(undesirable))
    expected = rpo_loss_by_hand(loss_cfg, chosen, rejected, weights, [0.0] * len(desirable))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    wins = sum(c > r for c in chosen for r in rejected)
    assert stats["rewards/accuracy"] == (pytest.approx(wins / (len(chosen) * len(rejected))), len(chosen) * len(rejected))
    same = [(c, r) for a, c in zip(desirable, chosen, strict=True) for b, r in zip(undesirable, rejected, strict=True)
            if prompt_of(items[a]) == prompt_of(items[b])]
    assert len(same) >= 1
    assert stats["rewards/accuracy_same_prompt"] == (pytest.approx(sum(c > r for c, r in same) / len(same)), len(same))


def test_kto_same_prompt_accuracy_compares_each_prompts_own_answers(make_cfg, tmp_path):
    """KTO's statistics: `rewards/accuracy` over every desirable x undesirable item of the batch,
    `rewards/accuracy_same_prompt` over those of one prompt only, from rewards beta * (log pi - log ref)."""
    cfg = make_cfg("loss=kto", "sft.enabled=false")
    trainer = perturbed(build(cfg, tmp_path))
    items = train.prepare_examples(cfg, load_datasets(cfg.datasets))["train"]
    indices = [8, 30, 51, 3, 12, 44, 61]
    indices += [j for j, item in enumerate(items) if prompt_of(item) in {prompt_of(items[8]), prompt_of(items[30])} and j not in indices]
    desirable = [i for i in indices if items[i].desirable]
    undesirable = [i for i in indices if not items[i].desirable]
    indices = desirable + undesirable
    _, stats = trainer.batch_loss(trainer.make_batch(trainer.train_set, indices), "train")
    padded = collate_items([trainer.train_set[i] for i in indices], indices, trainer.pad_id)
    rewards = (cfg.loss.beta * (full_logps(trainer.policy, padded) - trainer.reference_logps["train"][indices, 0].double())).tolist()
    split = len(desirable)
    chosen, rejected = dict(zip(desirable, rewards[:split], strict=True)), dict(zip(undesirable, rewards[split:], strict=True))
    same = [(a, b) for a in desirable for b in undesirable if prompt_of(items[a]) == prompt_of(items[b])]
    assert 2 <= len(same) < len(desirable) * len(undesirable)
    assert stats["rewards/accuracy_same_prompt"] == (pytest.approx(sum(chosen[a] > rejected[b] for a, b in same) / len(same)), len(same))
    wins = sum(chosen[a] > rejected[b] for a in desirable for b in undesirable)
    assert stats["rewards/accuracy"] == (pytest.approx(wins / (len(desirable) * len(undesirable))), len(desirable) * len(undesirable))

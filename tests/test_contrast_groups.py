"""`loss.contrast_group` through the trainer: the loss and every parameter gradient of a batch do
not depend on how it is split into micro-batches, whichever path computes them (one pass when
micro-batches hold whole groups, gradient caching when a group spans them).

float64 `tiny` (the policy nudged away from the reference, so rewards and margins are not zero):
the paths agree to 1e-10 relative; float32 would leave about 1e-6 of summation-order noise.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from tests.conftest import build, loss_config
from tests.test_contrast_losses import loss_by_hand
from tests.test_trainer import DROPOUT
from trainers.basic import BasicTrainer
from trainers.memory import MemoryPlan

LOSSES = {
    "rpo": ["loss=rpo"],
    "rpo + sr": ["loss=rpo", "loss.sr_lambda=0.5"],
    "rpo_unpaired": ["loss=rpo_unpaired"],
    "rpo_uniform": ["loss=rpo_uniform"],
    "rpo_uniform + sr": ["loss=rpo_uniform", "loss.sr_lambda=0.5"],
    "rpo_diagonal": ["loss=rpo_diagonal"],
    "rpo_diagonal + sr": ["loss=rpo_diagonal", "loss.sr_lambda=0.5"],
    "rpo_simpo": ["loss=rpo_simpo"],
    "rpo_simpo + sr": ["loss=rpo_simpo", "loss.sr_lambda=0.5"],
}


def rms_norm_in_its_own_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    """Transformers' Llama RMSNorm computes in float32 whatever its input: a prompt prefix shared by
    the segments of a packed row sums their gradients in another order in each split, and float32
    would round those float64 differences of 1e-16 to 1e-8. Here the norm keeps float64."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_its_own_dtype)


def float64_trainer(make_cfg, folder, *overrides: str) -> BasicTrainer:
    """A `tiny` align-stage trainer in float64 whose policy differs from its reference."""
    trainer = build(make_cfg("sft.enabled=false", *overrides), folder)
    trainer.policy.double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)
    return trainer


def gradients_with(trainer: BasicTrainer, indices: list[int], micro_batches: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The record and the parameter gradients of one batch in `micro_batches` micro-batches (no update)."""
    trainer.plan = MemoryPlan(len(indices) // micro_batches, micro_batches, fixed_steps=True)
    record = trainer.accumulate_gradients(indices)
    gradients = {name: parameter.grad.clone() for name, parameter in trainer.policy.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return record, gradients


PAIR_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


def assert_same(expected: tuple[dict, dict], got: tuple[dict, dict], rel: float = 1e-10, keys: tuple[str, ...] = PAIR_STATS) -> None:
    (expected_record, expected_gradients), (record, gradients) = expected, got
    for key in keys:
        assert record[key] == pytest.approx(expected_record[key], rel=rel, abs=1e-12), key
    for name, gradient in expected_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=rel, atol=1e-14, msg=name)


@pytest.mark.parametrize("case", list(LOSSES))
def test_one_group_split_into_1_2_4_micro_batches_gives_the_one_pass_loss_and_gradients(make_cfg, tmp_path, case):
    trainer = float64_trainer(make_cfg, tmp_path, *LOSSES[case], "train.batch_size=16", "loss.contrast_group=null")
    indices = trainer.sampler.take(16)
    one_pass = gradients_with(trainer, indices, 1)
    assert trainer.contrast_path == "one_pass"
    assert one_pass[0]["loss"] > 0 and max(g.abs().max() for g in one_pass[1].values()) > 1e-6
    for micro_batches in (2, 4):
        assert_same(one_pass, gradients_with(trainer, indices, micro_batches))
        assert trainer.contrast_path == "gradient_caching"
    if "sr" in case:
        assert one_pass[0]["sr/delta_std"] > 0  # the margin is there, and differs between pairs


def counted_forwards(trainer: BasicTrainer, monkeypatch) -> list[bool]:
    """Record, for each policy forward of the trainer, whether it tracked gradients."""
    forwards, original = [], type(trainer).logps

    def logps(self, model, batch):
        if model is self.policy:
            forwards.append(torch.is_grad_enabled())
        return original(self, model, batch)

    monkeypatch.setattr(type(trainer), "logps", logps)
    return forwards


def test_groups_that_fit_the_micro_batches_take_the_one_pass_path(make_cfg, tmp_path, monkeypatch, capsys):
    """Groups of 4 in micro-batches of 4 (or 8): one forward with gradients per micro-batch, and the
    same loss and gradients as the whole batch in one micro-batch and as gradient caching."""
    trainer = float64_trainer(make_cfg, tmp_path, "loss=rpo", "train.batch_size=16", "loss.contrast_group=4")
    indices = trainer.sampler.take(16)
    forwards = counted_forwards(trainer, monkeypatch)
    whole = gradients_with(trainer, indices, 1)
    for micro_batches in (2, 4):
        forwards.clear()
        assert_same(whole, gradients_with(trainer, indices, micro_batches))
        assert trainer.contrast_path == "one_pass" and forwards == [True] * micro_batches
    assert "contrast groups of 4 pairs, whole in micro-batches of 4 pairs: one pass" in capsys.readouterr().out
    forwards.clear()
    assert_same(whole, gradients_with(trainer, indices, 8))  # micro-batches of 2: a group spans two
    assert trainer.contrast_path == "gradient_caching" and forwards == [False] * 8 + [True] * 8
    assert "contrast groups of 4 pairs span micro-batches of 2 pairs: gradient caching" in capsys.readouterr().out


def test_gradient_caching_recomputes_with_the_same_dropout_masks(make_cfg, tmp_path, monkeypatch):
    trainer = float64_trainer(make_cfg, tmp_path, DROPOUT, "loss=rpo", "train.batch_size=8", "loss.contrast_group=null")
    seen, original = [], BasicTrainer.logps

    def logps(self, model, batch):
        values = original(self, model, batch)
        seen.append(values[0].detach().clone())
        return values

    monkeypatch.setattr(BasicTrainer, "logps", logps)
    indices = trainer.sampler.take(8)
    gradients_with(trainer, indices, 2)
    first_pass, second_pass = seen[:2], seen[2:]
    for before, again in zip(first_pass, second_pass, strict=True):
        torch.testing.assert_close(again, before, rtol=0, atol=0)
    batch = trainer.make_batch(trainer.train_set, indices[:4])
    assert not torch.equal(original(trainer, trainer.policy, batch)[0], original(trainer, trainer.policy, batch)[0])  # dropout is on


@pytest.mark.parametrize(("loss", "compat"), [("rpo", "paper"), ("rpo_uniform", "official"), ("rpo_diagonal", "official")])
def test_groups_of_8_over_64_pairs_are_the_official_codes_per_gpu_losses_averaged(make_cfg, tmp_path, loss, compat):
    """64 pairs on 1 process with contrast_group=8 give the official code's loss on 8 GPUs of 8 pairs
    each (eight independent 8 x 8 matrices, averaged over GPUs), whether the batch runs in one
    micro-batch, in eight of whole groups or in sixteen of half groups (gradient caching)."""
    trainer = float64_trainer(make_cfg, tmp_path, f"loss={loss}", f"loss.compat={compat}", "train.batch_size=64")
    assert trainer.loss.contrast_group == 8  # the RPO presets' default
    indices = trainer.sampler.take(64)
    cfg = {**loss_config(loss), "compat": compat}
    per_gpu = []
    for gpu in range(8):
        part = indices[8 * gpu : 8 * gpu + 8]
        batch = trainer.make_batch(trainer.train_set, part)
        with torch.no_grad():
            inputs = trainer.contrast_inputs(*trainer.logps(trainer.policy, batch), batch, "train", None)
        per_gpu.append(loss_by_hand(cfg, {key: value.double() for key, value in inputs.items()}))
    official = sum(per_gpu) / 8
    one_micro_batch = gradients_with(trainer, indices, 1)
    assert one_micro_batch[0]["loss"] == pytest.approx(official, rel=1e-10)
    assert_same(one_micro_batch, gradients_with(trainer, indices, 8))
    assert trainer.contrast_path == "one_pass"
    assert_same(one_micro_batch, gradients_with(trainer, indices, 16))
    assert trainer.contrast_path == "gradient_caching"
    trainer.loss = type(trainer.loss)(**{**trainer.loss.as_dict(), "contrast_group": None})
    assert abs(gradients_with(trainer, indices, 1)[0]["loss"] - official) > 1e-6  # one 64 x 64 matrix is another loss


def test_held_out_losses_use_the_groups_too(make_cfg, tmp_path):
    """Held-out batches of 8 pairs in groups of 2 are held-out batches of 2 in one group each."""
    def held_out_loss(name, group, eval_batch):
        overrides = ["loss=rpo", f"loss.contrast_group={group}", f"train.eval_batch_size={eval_batch}"]
        return float64_trainer(make_cfg, tmp_path / name, *overrides).evaluate()["loss"]

    grouped = held_out_loss("grouped", 2, 8)
    assert grouped == pytest.approx(held_out_loss("small batches", "null", 2), rel=1e-10)
    assert abs(grouped - held_out_loss("one matrix", "null", 8)) > 1e-6


def test_a_micro_batch_that_can_hold_a_group_is_dealt_whole_groups(make_cfg, tmp_path):
    """Micro-batches of at most 24 over 64 pairs: 3 of 21-22 would cut groups of 8, 4 of 16 do not."""
    trainer = build(make_cfg("sft.enabled=false", "loss=rpo", "train.batch_size=64", "train.micro_batch_size=24"), tmp_path)
    assert (trainer.plan.micro_batch, trainer.plan.accumulation_steps) == (24, 4)
    trainer.accumulate_gradients(trainer.sampler.take(64))
    assert trainer.contrast_path == "one_pass"
    dpo = build(make_cfg("sft.enabled=false", "loss=dpo", "train.batch_size=64", "train.micro_batch_size=24"), tmp_path / "dpo")
    assert dpo.plan.accumulation_steps == 3  # no groups to keep whole


def test_kto_reference_point_is_the_whole_batchs_however_it_is_split(make_cfg, tmp_path):
    """KTO couples its examples through z0 (the mean KL of the batch's mismatched pairs): micro-batches
    use the whole batch's, so 2 and 4 micro-batches give the one-pass loss and gradients."""
    trainer = float64_trainer(make_cfg, tmp_path, "loss=kto", "train.batch_size=16")
    indices = trainer.sampler.take(16)
    policy_kl, reference_kl = trainer.part_kl_pairs(trainer.make_batch(trainer.train_set, indices))
    trainer.reference_logps["train"][:, 1] -= float((policy_kl - reference_kl).mean().abs()) + 1  # z0 >= 1, not clamped
    one_pass = gradients_with(trainer, indices, 1)
    assert one_pass[0]["kl"] >= 1
    for micro_batches in (2, 4):
        # (the unpaired accuracy and margin compare the items of one micro-batch: monitoring only)
        assert_same(one_pass, gradients_with(trainer, indices, micro_batches), keys=("loss", "kl", "rewards/chosen", "rewards/rejected"))

"""Sr-DPO / Sr-IPO: the margin from the policy's own judgement on the prompt-augmented query."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import train
from preference_datasets import PairTokenizer, PreferencePair, augment, collate
from tests.conftest import ROOT, build, loss_config
from tests.test_contrast_losses import batch, reward_by_hand, weight_by_hand
from tests.test_loop_values import full_logps, perturbed
from trainers.losses import preference_loss

SR_DPO = loss_config("sr_dpo", beta=0.1, sr_lambda=0.5)
SR_IPO = loss_config("sr_ipo", beta=0.1, sr_lambda=0.5)
SR_IPO_SUM = loss_config("sr_ipo_sum", beta=0.1, sr_lambda=0.5)  # the Sr paper's: summed log-probs
PLAIN = {"sr_dpo": loss_config("dpo", beta=0.1), "sr_ipo": loss_config("ipo", beta=0.1), "sr_ipo_sum": loss_config("ipo_sum", beta=0.1)}


def pair_inputs(seed: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch(4, 4, seed=seed).items() if "embeddings" not in k}


@pytest.mark.parametrize("cfg", [SR_DPO, SR_IPO, SR_IPO_SUM], ids=["sr_dpo", "sr_ipo", "sr_ipo_sum"])
def test_lambda_zero_is_exactly_dpo_or_ipo(cfg):
    x = pair_inputs(1)
    margin = torch.randn(4, dtype=torch.float64)
    sr = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in x.items()}
    plain = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in x.items()}
    sr_loss = preference_loss(**sr, cfg={**cfg, "sr_lambda": 0.0}, margin=margin)[0]
    plain_loss = preference_loss(**plain, cfg=PLAIN[cfg["name"]])[0]
    assert sr_loss.item() == plain_loss.item()
    sr_loss.backward()
    plain_loss.backward()
    for key in ("policy_chosen_logps", "policy_rejected_logps"):
        assert torch.equal(sr[key].grad, plain[key].grad)


@pytest.mark.parametrize("cfg", [SR_DPO, SR_IPO, SR_IPO_SUM], ids=["sr_dpo", "sr_ipo", "sr_ipo_sum"])
def test_losses_match_the_equations_and_delta_carries_no_gradient(cfg):
    x = {k: v.requires_grad_(k.startswith("policy")) for k, v in pair_inputs(2).items()}
    delta = torch.tensor([0.3, -0.2, 1.1, 0.0], dtype=torch.float64, requires_grad=True)
    loss = preference_loss(**x, cfg=cfg, margin=delta)[0]
    beta, lam = cfg["beta"], cfg["sr_lambda"]
    expected = 0.0
    for i in range(4):
        ratio = lambda side: (x[f"policy_{side}_logps"][i] - x[f"reference_{side}_logps"][i]).item()  # noqa: B023, E731
        if cfg["name"] == "sr_dpo":
            h = ratio("chosen") - ratio("rejected")
            expected += math.log1p(math.exp(-(beta * h - lam * delta[i].item())))
        elif cfg["name"] == "sr_ipo_sum":  # summed log-ratios, as the Sr paper writes Sr-IPO
            h = ratio("chosen") - ratio("rejected")
            expected += (h - lam * delta[i].item() - 1 / (2 * beta)) ** 2
        else:  # per-token log-ratios, as IPO
            h = ratio("chosen") / int(x["chosen_lengths"][i]) - ratio("rejected") / int(x["rejected_lengths"][i])
            expected += (h - lam * delta[i].item() - 1 / (2 * beta)) ** 2
    assert loss.item() == pytest.approx(expected / 4, rel=1e-10)
    loss.backward()
    assert delta.grad is None and x["policy_chosen_logps"].grad is not None


def test_margin_shifts_every_rpo_row():
    """link(W_ij S_ij - lambda Delta_i): pair i's margin enters every entry of row i (and no other row)."""
    x = batch(3, 4, seed=4)
    delta = torch.tensor([0.5, 0.0, -0.8], dtype=torch.float64)
    cfg = loss_config("rpo", beta=0.1, tau=0.5, sr_lambda=1.0)
    expected = 0.0
    for i in range(3):
        for j in range(4):
            s = reward_by_hand(cfg, x, "chosen", i) - reward_by_hand(cfg, x, "rejected", j)
            expected += math.log1p(math.exp(-(weight_by_hand(cfg, x, i, j, 3, 4) * s - cfg["sr_lambda"] * delta[i].item())))
    assert preference_loss(**x, cfg=cfg, margin=delta)[0].item() == pytest.approx(expected / 12, rel=1e-10)


SR_PROMPT = "Please generate a response with a usefulness rating of 100 out of 100. Query:"


def test_augmented_prompt_keeps_p_whole_and_cuts_the_query(smollm2_tokenizer):
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(60)) + " end?"}]
    assert augment(messages, SR_PROMPT)[0]["content"].startswith(SR_PROMPT + " w0")
    encode = PairTokenizer(smollm2_tokenizer, max_length=200, max_prompt_length=72, sr_prompt=SR_PROMPT)
    tokens = encode(PreferencePair(messages, "yes", "no"))
    text = smollm2_tokenizer.decode(tokens.augmented.prompt)
    assert len(tokens.augmented.prompt) == 72
    assert f"user\n{SR_PROMPT} w" in text  # p whole, then what is left of the query
    assert "w0 " not in text and text.endswith("end?<|im_end|>\n<|im_start|>assistant\n")
    assert tokens.augmented.chosen == tokens.chosen and tokens.prompt != tokens.augmented.prompt
    with pytest.raises(ValueError, match="no room for the query"):
        PairTokenizer(smollm2_tokenizer, max_length=200, max_prompt_length=30, sr_prompt=SR_PROMPT)(PreferencePair(messages, "y", "n"))


@pytest.mark.parametrize("loss", ["sr_dpo", "sr_ipo", "sr_ipo_sum"])
def test_refined_delta_is_the_policy_judgement_on_p_plus_x(make_cfg, tmp_path, loss):
    """Delta by hand (full-vocabulary forward on p + x, the cached reference on p + x) after the policy
    has moved away from the reference, so that Delta is far from zero."""
    trainer = perturbed(build(make_cfg(f"loss={loss}"), tmp_path))
    assert trainer.train_set[0].augmented is not None and "train/augmented" in trainer.reference_logps
    indices = [0, 1, 2]
    pair_batch = trainer.make_batch(trainer.train_set, indices)
    logps, counts = trainer.logps(trainer.policy, pair_batch)
    delta = trainer.self_refinement_margin(logps, counts, trainer.reference_batch_logps(pair_batch, "train"), pair_batch, "train")
    augmented = collate([trainer.train_set[i].augmented for i in indices], indices, trainer.pad_id)
    ratios = full_logps(trainer.policy, augmented).view(2, -1) - trainer.reference_logps["train/augmented"][indices].double().T
    if loss == "sr_ipo":  # per token, as IPO's h
        ratios = ratios / torch.tensor([[len(trainer.train_set[i].augmented.chosen) for i in indices],
                                        [len(trainer.train_set[i].augmented.rejected) for i in indices]])
    expected = 0.1 * (ratios[0] - ratios[1])
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(delta.double(), expected, rtol=1e-4, atol=1e-6)
    assert not delta.requires_grad


def test_naive_delta_uses_the_unaugmented_log_probs(make_cfg, tmp_path):
    trainer = perturbed(build(make_cfg("loss=sr_dpo", "loss.sr_delta=naive"), tmp_path))
    assert trainer.train_set[0].augmented is None and "train/augmented" not in trainer.reference_logps
    pair_batch = trainer.make_batch(trainer.train_set, range(3))
    logps, counts = trainer.logps(trainer.policy, pair_batch)
    delta = trainer.self_refinement_margin(logps, counts, trainer.reference_batch_logps(pair_batch, "train"), pair_batch, "train")
    padded = collate(trainer.train_set[:3], range(3), trainer.pad_id)
    ratios = full_logps(trainer.policy, padded).view(2, -1) - trainer.reference_logps["train"][:3].double().T
    expected = 0.1 * (ratios[0] - ratios[1])
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(delta.double(), expected, rtol=1e-4, atol=1e-6)
    assert not delta.requires_grad
    _, stats = trainer.batch_loss(pair_batch, "train")
    assert "sr/delta_mean" in stats and "sr/accuracy_augmented" not in stats  # naive: no p + x to judge on


@pytest.mark.parametrize("overrides", [["loss=sr_dpo"], ["loss=sr_ipo"], ["loss=rpo", "loss.sr_lambda=0.5"]])
def test_self_refined_runs_end_to_end(make_cfg, tmp_path, overrides):
    summary = train.run(make_cfg(*overrides, "sft.max_examples=8"), tmp_path / "run")
    final = summary["stages"]["align"]["final_eval"]
    assert {"sr/delta_mean", "sr/delta_std", "sr/accuracy_augmented", "rewards/accuracy"} <= final.keys()


def test_lambda_sweep_with_hydra_multirun(tmp_path, shared_cache):
    command = [
        sys.executable, "train.py", "-m", "loss=sr_dpo", "loss.sr_lambda=0.1,0.3,0.5,1", "model=tiny", "sft.enabled=false",
        "align.max_examples=8", "train.batch_size=4", "train.max_eval_examples=4", "eval.after_training=none",
        f"runs_root={tmp_path / 'runs'}", f"cache_dir={shared_cache}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ})
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted((tmp_path / "runs" / "multirun").glob("*/*/summary.json"))
    assert len(summaries) == 4
    lambdas = sorted(float(__import__("omegaconf").OmegaConf.load(s.parent / "config.yaml").loss.sr_lambda) for s in summaries)
    assert lambdas == [0.1, 0.3, 0.5, 1.0]

"""Sr-DPO / Sr-IPO: the margin from the policy's own judgement on the prompt-augmented query."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import train
from preference_datasets import PairTokenizer, PreferencePair, augment, collate
from tests.conftest import ROOT, build
from tests.test_contrast_losses import batch
from trainers.losses import preference_loss

SR_DPO = {"name": "sr_dpo", "beta": 0.1, "sr_lambda": 0.5}
SR_IPO = {"name": "sr_ipo", "beta": 0.1, "sr_lambda": 0.5}
PLAIN = {"sr_dpo": {"name": "dpo", "beta": 0.1}, "sr_ipo": {"name": "ipo", "beta": 0.1}}


def pair_inputs(seed: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch(4, 4, seed=seed).items() if "embeddings" not in k}


@pytest.mark.parametrize("cfg", [SR_DPO, SR_IPO], ids=["sr_dpo", "sr_ipo"])
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


@pytest.mark.parametrize("cfg", [SR_DPO, SR_IPO], ids=["sr_dpo", "sr_ipo"])
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
        else:  # per-token log-ratios, as IPO
            h = ratio("chosen") / int(x["chosen_lengths"][i]) - ratio("rejected") / int(x["rejected_lengths"][i])
            expected += (h - lam * delta[i].item() - 1 / (2 * beta)) ** 2
    assert loss.item() == pytest.approx(expected / 4, rel=1e-10)
    loss.backward()
    assert delta.grad is None and x["policy_chosen_logps"].grad is not None


def test_margin_shifts_every_rpo_row():
    x = batch(3, 3, seed=4)
    delta = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    cfg = {"name": "rpo", "beta": 0.1, "tau": 0.5, "sr_lambda": 1.0}
    shifted = preference_loss(**x, cfg=cfg, margin=delta)[0]
    assert shifted.item() != preference_loss(**x, cfg=cfg)[0].item()
    with pytest.raises(KeyError, match="loss.sr_lambda"):
        preference_loss(**x, cfg={"name": "rpo", "beta": 0.1, "tau": 0.5}, margin=delta)


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


def test_refined_delta_is_the_policy_judgement_on_p_plus_x(make_cfg, tmp_path):
    trainer = build(make_cfg("loss=sr_dpo"), tmp_path)
    assert trainer.train_set[0].augmented is not None and "train/augmented" in trainer.reference_logps
    indices = [0, 1, 2]
    pair_batch = collate([trainer.train_set[i] for i in indices], indices, trainer.pad_id)
    logps, counts = trainer.logps(trainer.policy, pair_batch)
    delta = trainer.self_refinement_margin(logps, counts, trainer.reference_batch_logps(pair_batch, "train"), pair_batch, "train")
    augmented = collate([trainer.train_set[i].augmented for i in indices], indices, trainer.pad_id)
    with torch.no_grad():
        policy, _ = trainer.logps(trainer.policy, augmented)
    reference = trainer.reference_logps["train/augmented"][indices]
    expected = 0.1 * ((policy.view(2, -1)[0] - reference[:, 0]) - (policy.view(2, -1)[1] - reference[:, 1]))
    torch.testing.assert_close(delta, expected)
    assert not delta.requires_grad


def test_naive_delta_uses_the_unaugmented_log_probs(make_cfg, tmp_path):
    trainer = build(make_cfg("loss=sr_dpo", "loss.sr_delta=naive"), tmp_path)
    assert trainer.train_set[0].augmented is None and "train/augmented" not in trainer.reference_logps
    pair_batch = collate(trainer.train_set[:3], range(3), trainer.pad_id)
    logps, counts = trainer.logps(trainer.policy, pair_batch)
    reference = trainer.reference_batch_logps(pair_batch, "train")
    delta = trainer.self_refinement_margin(logps, counts, reference, pair_batch, "train")
    chosen, rejected = logps.view(2, -1)
    torch.testing.assert_close(delta, (0.1 * ((chosen - reference[0]) - (rejected - reference[1]))).detach())
    assert not delta.requires_grad


@pytest.mark.parametrize("overrides", [["loss=sr_dpo"], ["loss=sr_ipo"], ["loss=rpo", "loss.sr_lambda=0.5"]])
def test_self_refined_runs_end_to_end(make_cfg, tmp_path, overrides):
    summary = train.run(make_cfg(*overrides, "sft.max_examples=8"), tmp_path / "run")
    final = summary["stages"]["align"]["final_eval"]
    assert {"sr/delta_mean", "sr/delta_std", "sr/accuracy_augmented", "rewards/accuracy"} <= final.keys()


def test_lambda_sweep_with_hydra_multirun(tmp_path, shared_cache):
    command = [
        sys.executable, "train.py", "-m", "loss=sr_dpo", "loss.sr_lambda=0.1,0.3,0.5,1", "model=tiny", "sft.enabled=false",
        "align.max_examples=8", "train.batch_size=4", "train.max_eval_examples=4",
        f"runs_root={tmp_path / 'runs'}", f"cache_dir={shared_cache}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ})
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted((tmp_path / "runs" / "multirun").glob("*/*/summary.json"))
    assert len(summaries) == 4
    lambdas = sorted(float(__import__("omegaconf").OmegaConf.load(s.parent / "config.yaml").loss.sr_lambda) for s in summaries)
    assert lambdas == [0.1, 0.3, 0.5, 1.0]

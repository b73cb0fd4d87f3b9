"""`train.packing`: each prompt computed once for its responses, several segments per row, no
padding between them. Every sequence's log-prob and gradient equal those of the sequence run alone
(the plain forward of prompt + response, no padding at all) and those of the padded layout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from preference_datasets import TokenizedPair, TokenizedResponse, collate, collate_items, pack_sequences, shared_prefix_length
from tests.conftest import build
from utils import packed_logps_and_continuation, packed_response_logps, position_cost, response_logps

# random-init model families the papers' presets use: Llama / Mistral (RPO), GPT-NeoX (Pythia, Sr),
# Gemma 2 (SimPO + RPO: eager attention, logit soft-capping, alternating sliding-window layers)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "gpt_neox": {"rotary_pct": 0.25},
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16},
}


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        family, vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **FAMILIES[family],
    )
    return AutoModelForCausalLM.from_config(config).eval()


def random_pairs(count: int, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of varied lengths: prompts of 1 to 40 tokens, responses of 1 to 25 (some of length 1)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(longest: int) -> list[int]:
        length = int(torch.randint(1, longest + 1, (), generator=generator))
        return torch.randint(1, 97, (length,), generator=generator).tolist()

    return [TokenizedPair(tokens(40), tokens(25), tokens(25)) for _ in range(count)]


def alone(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response | prompt) from the full-vocabulary log-softmax of the sequence run alone."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response).unsqueeze(-1)).sum()


def packed_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    keys = ("input_ids", "position_ids", "segment", "part", "predict_at", "targets", "owners")
    return packed_response_logps(model, *(batch[key] for key in keys), batch["sequences"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_log_probs_equal_each_sequence_run_alone(family):
    model = tiny_model(family)
    pairs = random_pairs(7)
    packed = collate(pairs, range(7), pad_id=0, packed=True)
    assert len(packed["input_ids"]) < 7  # short segments share rows
    assert (packed["segment"] == -1).any()  # and the last rows end in padding
    with torch.no_grad():
        logps, counts = packed_logps(model, packed)
        expected = torch.stack([alone(model, p.prompt, p.chosen) for p in pairs] + [alone(model, p.prompt, p.rejected) for p in pairs])
        padded = collate(pairs, range(7), pad_id=0)
        padded_logps, padded_counts = response_logps(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_logps, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == padded_counts.tolist() == [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    assert packed["tokens"] == padded["tokens"] == int(padded["attention_mask"].sum())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_gradients_equal_the_padded_layouts(family):
    """The gradient of a weighted sum of the log-probs (what every loss backpropagates) is the same."""
    pairs = random_pairs(6, seed=1)
    weights = torch.linspace(-1, 1, 12)
    gradients = []
    for packed in (False, True):
        model = tiny_model(family).train()
        batch = collate(pairs, range(6), pad_id=0, packed=packed)
        if packed:
            logps = packed_logps(model, batch)[0]
        else:
            logps = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        (weights * logps).sum().backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, gradient in gradients[0].items():  # to 1e-5 of each tensor's largest entry: fp32 summation order
        assert (gradients[1][name] - gradient).abs().max() <= 1e-5 * gradient.abs().max(), name


def test_pack_sequences_layout():
    """Two prompts of 3 and 2 tokens with responses (2, 1) and (1, 1): one row of 6 and one of 4 tokens
    padded to 6; each response's positions continue from its prompt's end."""
    batch = pack_sequences([[11, 12, 13], [21, 22]], [[[31, 32], [41]], [[51], [61]]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 31, 32, 41], [21, 22, 51, 61, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 0, 0]]
    assert batch["part"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 2, -1, -1]]
    # sequence k * 2 + s: segment s's response k; the prompt's last position predicts each first token
    assert list(zip(batch["predict_at"].tolist(), batch["targets"].tolist(), batch["owners"].tolist(), strict=True)) == [
        (2, 31, 0), (3, 32, 0), (2, 41, 2), (7, 51, 1), (7, 61, 3)
    ]
    assert batch["sequences"] == 4 and batch["tokens"] == 5 + 4 + 3 + 3


def prefixed_pairs(count: int, seed: int) -> list[TokenizedPair]:
    """`random_pairs` behind one 12-token header (a chat template's system turn, Sr's prompt p); one
    prompt is the header and a single token, two are the same prompt."""
    header = torch.randint(1, 97, (12,), generator=torch.Generator().manual_seed(seed + 100)).tolist()
    pairs = [TokenizedPair(header + p.prompt, p.chosen, p.rejected) for p in random_pairs(count, seed)]
    pairs[1] = TokenizedPair(header + [5], pairs[1].chosen, pairs[1].rejected)
    pairs[2] = TokenizedPair(pairs[3].prompt, pairs[2].chosen, pairs[2].rejected)
    return pairs


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]]) == 2  # the shortest keeps its last token
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 9, 4]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3]]) == 0  # nothing to share
    assert shared_prefix_length([[1, 2], []]) == 0
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0


def test_shared_prefix_layout():
    """Prompts [1, 2, 3] and [1, 2, 4, 5] share [1, 2]: a row starts with it once (segment -2), the
    segments follow, their positions continuing from it. Rows as long as the longest segment (7) take
    two: one row of 12 is cheaper where a position's work outweighs attention's, not otherwise."""
    prompts, responses = [[1, 2, 3], [1, 2, 4, 5]], [[[31], [41]], [[51, 52], [61]]]
    batch = pack_sequences(prompts, responses, pad_id=0, position_cost=1e6)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 51, 52, 61, 3, 31, 41, 0, 0]]
    assert batch["segment"].tolist() == [[-2, -2, 1, 1, 1, 1, 1, 0, 0, 0, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 4, 2, 3, 3, 0, 0]]
    assert batch["part"].tolist() == [[0, 0, 0, 0, 1, 1, 2, 0, 1, 2, -1, -1]]
    assert list(zip(batch["predict_at"].tolist(), batch["targets"].tolist(), batch["owners"].tolist(), strict=True)) == [
        (3, 51, 1), (4, 52, 1), (3, 61, 3), (7, 31, 0), (7, 41, 2)
    ]
    assert batch["tokens"] == 3 * 2 + 2 + 4 * 2 + 3  # what the padded layout computes
    for cost in (0, 1):  # 2 x (7 x cost + 7^2) <= 12 x cost + 12^2
        narrow = pack_sequences(prompts, responses, pad_id=0, position_cost=cost)
        assert narrow["input_ids"].tolist() == [[1, 2, 4, 5, 51, 52, 61], [1, 2, 3, 31, 41, 0, 0]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_shared_prefix_gives_each_sequence_run_alone(family):
    model = tiny_model(family)
    pairs = prefixed_pairs(7, seed=2)
    packed = collate(pairs, range(7), pad_id=0, packed=True, position_cost=1e6)
    assert len(packed["input_ids"]) == 1 and (packed["segment"] == -2).sum() == 12
    with torch.no_grad():
        logps, counts = packed_logps(model, packed)
        expected = torch.stack([alone(model, p.prompt, p.chosen) for p in pairs] + [alone(model, p.prompt, p.rejected) for p in pairs])
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]


@pytest.mark.parametrize("position_cost", [0, 1e6])
def test_a_shared_prefix_gives_the_padded_layouts_gradients(position_cost):
    pairs = prefixed_pairs(6, seed=3)
    weights = torch.linspace(-1, 1, 12)
    gradients = []
    for packed in (False, True):
        model = tiny_model("llama").train()
        batch = collate(pairs, range(6), pad_id=0, packed=packed, position_cost=position_cost)
        if packed:
            assert (batch["segment"] == -2).any()
            logps = packed_logps(model, batch)[0]
        else:
            logps = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
        (weights * logps).sum().backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, gradient in gradients[0].items():
        assert (gradients[1][name] - gradient).abs().max() <= 1e-5 * gradient.abs().max(), name


def prefixed_items(count: int, seed: int) -> list[TokenizedResponse]:
    """Unpaired items of `prefixed_pairs`' prompts, each with a mismatched response (KTO's KL pair):
    another item's chosen response; one mismatched response is a single token."""
    pairs = prefixed_pairs(count, seed)
    items = [TokenizedResponse(p.prompt, p.chosen, k % 2 == 0, pairs[(k + 1) % count].chosen) for k, p in enumerate(pairs)]
    items[4] = TokenizedResponse(items[4].prompt, items[4].response, items[4].desirable, [7])
    return items


def item_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = ("input_ids", "position_ids", "segment", "sequence", "predict_at", "targets", "owners")
    continuation = [*(batch["mismatched"][key] for key in keys), batch["mismatched"]["sequences"]]
    layout = [batch[key] for key in ("input_ids", "position_ids", "segment", "part", "predict_at", "targets", "owners")]
    return packed_logps_and_continuation(model, *layout, batch["sequences"], continuation)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("position_cost", [0, 1e6])
def test_mismatched_continuations_give_each_sequence_run_alone(family, position_cost):
    """KTO's mismatched responses scored from the batch's own keys and values of their prompts equal
    each prompt + response run alone, in rows ending in padding (position cost 0) or in one row. Two
    items share a prompt, and so one segment: their continuations see the prompt, not each other."""
    model = tiny_model(family)
    items = prefixed_items(7, seed=4)
    batch = collate_items(items, range(7), pad_id=0, packed=True, position_cost=position_cost, continue_prompts=True)
    assert int(batch["segment"].max()) + 1 == 6  # items 2 and 3 share a prompt
    rows = len(batch["input_ids"])
    assert rows > 1 if position_cost == 0 else rows == 1
    assert len(batch["mismatched"]["input_ids"]) == rows
    assert bool((batch["mismatched"]["segment"] == -1).any()) == (rows > 1)  # rows of unequal continuations
    logps, counts, mismatched = item_logps(model, batch)
    with torch.no_grad():
        expected = torch.stack([alone(model, item.prompt, item.response) for item in items])
        expected_mismatched = torch.stack([alone(model, item.prompt, item.mismatched) for item in items])
    torch.testing.assert_close(logps.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mismatched, expected_mismatched, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(item.response) for item in items]
    assert logps.requires_grad and not mismatched.requires_grad


def test_scoring_the_continuations_leaves_the_gradients_unchanged():
    """The forward that keeps its keys and values for the continuations backpropagates as the plain
    packed forward does: the continuations add nothing to the graph."""
    items = prefixed_items(6, seed=5)
    batch = collate_items(items, range(6), pad_id=0, packed=True, position_cost=1e6, continue_prompts=True)
    weights = torch.linspace(-1, 1, 6)
    gradients = []
    for continued in (False, True):
        model = tiny_model("llama").train()
        logps = item_logps(model, batch)[0] if continued else packed_logps(model, batch)[0]
        (weights * logps).sum().backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=0, atol=0)


def test_continuation_layout():
    """Items [1, 2, 3] -> [31], [1, 2, 4, 5] -> [51, 52] and [1, 2, 3] -> [32] behind the shared [1, 2]:
    the first and third share a segment, and the three fill one row. Their continuations [81, 82],
    [91] and [71]: each one's positions follow its prompt's end, its first token is predicted by that
    prompt's last position, its others by its own (after the row's 10 positions)."""
    items = [TokenizedResponse([1, 2, 3], [31], True, [81, 82]), TokenizedResponse([1, 2, 4, 5], [51, 52], False, [91]),
             TokenizedResponse([1, 2, 3], [32], False, [71])]
    batch = collate_items(items, range(3), pad_id=0, packed=True, position_cost=1e6, continue_prompts=True)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 51, 52, 3, 31, 32, 0]]
    scored = zip(batch["predict_at"].tolist(), batch["targets"].tolist(), batch["owners"].tolist(), strict=True)
    assert list(scored) == [(3, 51, 1), (4, 52, 1), (6, 31, 0), (6, 32, 2)]  # owners are items
    assert batch["sequences"] == 3
    continuation = batch["mismatched"]
    assert continuation["input_ids"].tolist() == [[81, 82, 91, 71]]
    assert continuation["segment"].tolist() == [[0, 0, 1, 0]]
    assert continuation["sequence"].tolist() == [[0, 0, 1, 2]]
    assert continuation["position_ids"].tolist() == [[3, 4, 4, 3]]
    scored = zip(continuation["predict_at"].tolist(), continuation["targets"].tolist(), continuation["owners"].tolist(), strict=True)
    assert list(scored) == [(6, 81, 0), (10, 82, 0), (3, 91, 1), (6, 71, 2)]
    assert continuation["sequences"] == 3


def test_activation_checkpointing_runs_the_mismatched_sequences_alone(make_cfg, tmp_path):
    """Activation checkpointing turns the key/value cache off: KTO then scores its mismatched pairs
    in a forward of their own, and the loss and KL estimate are those of the continued layout."""
    losses = []
    for checkpointing in ("false", "true"):
        cfg = make_cfg("sft.enabled=false", "loss=kto", f"train.activation_checkpointing={checkpointing}")
        trainer = build(cfg, tmp_path / checkpointing)
        assert trainer.continues_prompts == (checkpointing == "false")
        batch = trainer.make_batch(trainer.train_set, trainer.sampler.take(8))
        assert ("part" in batch["mismatched"]) == (checkpointing == "true")
        loss, stats = trainer.batch_loss(batch, "train")
        losses.append((loss.item(), stats["kl"][0]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)


def test_position_cost():
    """tiny llama: per layer q, o 64 x 64, k, v 64 x 32 (2 of 4 heads), MLP 3 x 64 x 128, two norms
    of 64, and half the final norm; over 2 x 64 multiply-adds per attention pair. Eager: 0."""
    model = tiny_model("llama")
    assert position_cost(model) == pytest.approx((2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64 + 64 / 2) / (2 * 64))
    model.config._attn_implementation = "eager"
    assert position_cost(model) == 0


def test_multi_turn_prompts_through_the_trainer_give_the_padded_losses(make_cfg, tmp_path):
    """Real multi-turn HH dialogues through the trainer: the packed and padded layouts give the same
    DPO loss and parameter gradients (and a packed micro-batch holds fewer token positions)."""
    overrides = ["sft.enabled=false", "loss=sr_dpo", "datasets=[hh]", "datasets.hh.path=../shared/data/hh-rlhf",
                 "datasets.hh.max_train_examples=16", "datasets.hh.max_test_examples=8", "max_length=256", "max_prompt_length=192"]
    results = []
    for packing in ("false", "true"):
        trainer = build(make_cfg(*overrides, f"train.packing={packing}"), tmp_path / packing)
        turns = [trainer.tokenizer.decode(pair.prompt).count("<|im_start|>user") for pair in trainer.train_set]
        indices = sorted(range(len(turns)), key=lambda i: -turns[i])[:4]
        assert min(turns[i] for i in indices) >= 2
        batch = trainer.make_batch(trainer.train_set, indices)
        record = trainer.accumulate_gradients(indices)
        results.append((record, {n: p.grad.clone() for n, p in trainer.policy.named_parameters()}, batch["input_ids"].numel()))
    (padded, padded_gradients, padded_positions), (packed, packed_gradients, packed_positions) = results
    for key in ("loss", "rewards/chosen", "rewards/rejected", "sr/delta_mean", "tokens"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), key
    for name, gradient in padded_gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    assert packed_positions < padded_positions

"""`utils.TargetLogps`: the LM head and log-softmax on response positions, in chunks with the logits
recomputed in the backward. Values and gradients equal the plain full-vocabulary autograd path."""

from __future__ import annotations

import pytest
import torch

import utils
from preference_datasets import collate
from tests.test_packing import alone, packed_logps, random_pairs, tiny_model


def plain_target_logps(hidden, weight, bias, targets, softcap):
    """log_softmax(head(hidden))[target] by autograd, every logit of the batch alive at once."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def head_inputs(with_bias: bool) -> tuple:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=generator).requires_grad_()
    weight = (3 * torch.randn(37, 16, generator=generator)).requires_grad_()  # large logits: the cap matters
    bias = torch.randn(37, generator=generator).requires_grad_() if with_bias else None
    return hidden, weight, bias, torch.randint(0, 37, (10,), generator=generator)


def values_and_gradients(function, hidden, weight, bias, targets, softcap, autocast: bool = False) -> list[torch.Tensor]:
    """The values and the gradients of a weighted sum; the forward under bfloat16 autocast if asked,
    the backward outside it (as the trainer runs them)."""
    inputs = [tensor for tensor in (hidden, weight, bias) if tensor is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        values = function(hidden, weight, bias, targets, softcap)
    gradients = torch.autograd.grad((torch.linspace(-2, 1, len(values)) * values).sum(), inputs)
    return [values.detach(), *gradients]


@pytest.mark.parametrize("chunk", [1, 3, 10, 256])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_equals_the_full_log_softmax(monkeypatch, chunk, softcap, with_bias):
    monkeypatch.setattr(utils, "LOGIT_CHUNK", chunk)
    inputs = head_inputs(with_bias)
    expected = values_and_gradients(plain_target_logps, *inputs, softcap)
    actual = values_and_gradients(utils.TargetLogps.apply, *inputs, softcap)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_batch_wide_logits_are_kept_for_the_backward():
    """What the forward saves for the backward holds no [positions, vocab] tensor (only the head's
    own weight is vocabulary-sized): the logits are recomputed chunk by chunk."""
    hidden, weight, bias, targets = head_inputs(with_bias=False)
    saved = []

    def keep(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        utils.TargetLogps.apply(hidden, weight, bias, targets, None)
    assert saved and all(shape != (len(hidden), len(weight)) for shape in saved), saved


def test_bf16_autocast_runs_the_head_in_bf16_with_float32_gradients():
    """Under autocast the chunks' matmuls run in bfloat16 as `linear` would, gradients come back in
    the inputs' float32, and the result is the plain autocast path's."""
    inputs = head_inputs(with_bias=False)
    expected = values_and_gradients(plain_target_logps, *inputs, None, autocast=True)
    actual = values_and_gradients(utils.TargetLogps.apply, *inputs, None, autocast=True)
    float32 = values_and_gradients(plain_target_logps, *inputs, None)
    assert [tensor.dtype for tensor in actual] == [torch.float32] * 3
    for got, want, exact in zip(actual, expected, float32, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - exact).abs().max() > 1e-4  # bfloat16 rounding shows: the head did not run in float32


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_model_gradients_equal_full_vocabulary_autograd(monkeypatch, family):
    """Through a whole model (Gemma 2: tied embeddings, soft-capped logits), chunks of 5 positions:
    every parameter's gradient equals that of the sequences run alone with full-vocabulary logits."""
    monkeypatch.setattr(utils, "LOGIT_CHUNK", 5)
    pairs = random_pairs(5, seed=2)
    weights = torch.linspace(-1, 1, 10)
    gradients = []
    for chunked in (False, True):
        model = tiny_model(family).train()
        if chunked:
            logps = packed_logps(model, collate(pairs, range(5), pad_id=0, packed=True))[0]
        else:
            logps = torch.stack([alone(model, p.prompt, p.chosen) for p in pairs] + [alone(model, p.prompt, p.rejected) for p in pairs])
        (weights * logps).sum().backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, gradient in gradients[0].items():  # to 1e-5 of each tensor's largest entry: fp32 summation order
        assert (gradients[1][name] - gradient).abs().max() <= 1e-5 * gradient.abs().max(), name

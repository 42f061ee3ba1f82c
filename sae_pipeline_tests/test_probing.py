"""k-sparse probing: the logistic fit, the balanced split, the latent choice and the accuracies, on hand-built
data whose answers are known."""

import pytest
import torch

from sae_pipeline.probing import (
    MIN_CLASS,
    BinaryTask,
    balanced_split,
    dense_probing,
    fit_logistic,
    mean_difference_latents,
    sparse_accuracies,
    sparse_probing,
)


def _penalised_gradient(x: torch.Tensor, y: torch.Tensor, probe, l2: float) -> torch.Tensor:
    """The gradient of the penalised mean logistic loss at the fitted coefficients, by autograd."""
    features = (x.double() - probe.mean) / probe.std
    weight = probe.weight.clone().requires_grad_(True)
    bias = probe.bias.clone().requires_grad_(True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ weight + bias, y.double())
    (loss + 0.5 * l2 * weight.pow(2).sum()).backward()
    return torch.cat([weight.grad, bias.grad.reshape(1)])


def test_fit_logistic_reaches_the_penalised_optimum():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator) * torch.tensor([1.0, 5.0, 0.1, 2.0, 1.0, 3.0])
    y = (x[:, 0] + 0.3 * x[:, 1] - 2 * x[:, 2] + 0.5 * torch.randn(300, generator=generator)) > 0
    probe = fit_logistic(x, y, l2=1e-2)
    assert _penalised_gradient(x, y, probe, 1e-2).abs().max() < 1e-6
    assert probe.accuracy(x, y) > 0.8


def test_fit_logistic_balanced_weighs_each_class_half():
    x = torch.cat([torch.randn(20, 2) + 1.0, torch.randn(380, 2) - 1.0])
    y = torch.arange(400) < 20
    plain, balanced = fit_logistic(x, y), fit_logistic(x, y, balanced=True)
    recall = lambda probe: (probe.logits(x[y]) > 0).double().mean().item()  # noqa: E731
    assert recall(balanced) >= recall(plain)
    assert balanced.bias > plain.bias  # the rare positive class pulls the boundary its way


def test_fit_logistic_constant_feature_gets_no_weight():
    x = torch.stack([torch.linspace(-1, 1, 50), torch.full((50,), 3.0)], dim=1)
    probe = fit_logistic(x, x[:, 0] > 0)
    assert probe.weight[1] == 0
    assert probe.accuracy(x, x[:, 0] > 0) == 1.0


def test_balanced_split_is_balanced_disjoint_and_held_out():
    y = torch.arange(100) < 30
    split = balanced_split(y, seed=3)
    assert int(y[split.train].sum()) == int((~y[split.train]).sum()) == 24
    assert int(y[split.test].sum()) == int((~y[split.test]).sum()) == 6
    assert not set(split.train.tolist()) & set(split.test.tolist())
    assert balanced_split(torch.arange(100) < MIN_CLASS - 1, seed=0) is None


def test_mean_difference_is_signed():
    y = torch.tensor([True] * 4 + [False] * 4)
    latents = torch.zeros(8, 4)
    latents[:4, 2] = 5.0  # fires for the class
    latents[4:, 1] = 9.0  # fires against it: a larger |difference|, but not chosen first
    latents[:4, 3] = 1.0
    assert mean_difference_latents(latents, y, 2).tolist() == [2, 3]


def test_planted_latent_is_found_and_noise_is_chance():
    generator = torch.Generator().manual_seed(1)
    y = torch.rand(400, generator=generator) < 0.5
    latents = torch.rand(400, 30, generator=generator)
    latents[:, 7] = y.float() * 2.0
    split = balanced_split(y, seed=0)
    assert sparse_accuracies(latents, y, split, (1, 5)) == {1: 1.0, 5: 1.0}
    noise = sparse_accuracies(torch.rand(400, 30, generator=generator), y, split, (1,))
    assert 0.3 < noise[1] < 0.7


def test_sparse_probing_encodes_shared_inputs_once_and_dense_is_the_ceiling():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(200, 5, generator=generator)
    tasks = [BinaryTask("a", x, x[:, 0] > 0), BinaryTask("b", x, x[:, 1] > 0)]
    calls = []

    def encode(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(len(inputs))
        return torch.relu(torch.cat([inputs, -inputs], dim=1))

    result = sparse_probing(tasks, encode, seed=0, ks=(1, 2))
    assert calls == [200]
    assert set(result.by_task) == {"a", "b"}
    assert result.mean(2) == (result.by_task["a"][2] + result.by_task["b"][2]) / 2
    ceiling = dense_probing(tasks, seed=0)
    assert min(ceiling.values()) > 0.9


def test_the_mean_is_over_families_each_over_its_tasks():
    from sae_pipeline.probing import ProbingResult

    result = ProbingResult({"a1": {1: 0.9}, "a2": {1: 0.7}, "a3": {1: 0.8}, "b": {1: 0.5}},
                           {"a1": "a", "a2": "a", "a3": "a", "b": "b"})
    assert result.family_means(1) == pytest.approx({"a": 0.8, "b": 0.5})
    assert result.mean(1) == pytest.approx(0.65)  # not (0.9 + 0.7 + 0.8 + 0.5) / 4

"""k-sparse probing (SAEBench's `sparse_probing`, Gao et al. 2024): how well the k latents that best separate a
binary task's classes, alone, predict it.

Protocol (SAEBench's): each binary task is balanced (the larger class subsampled to the smaller's size) and split
into train and held-out test rows; on the train rows the k latents with the largest mean difference
(mean over positives minus mean over negatives: latents that fire *for* the class) are chosen, a logistic
regression is fitted on those k latents, and its accuracy on the test rows is the score. The same regression on
the raw activations is the ceiling, and on the latents of a randomly initialised SAE of the same shape the floor.
An SAE's score at k is the mean over task families (SAEBench's datasets: the one-vs-rest tasks of one labelling)
of each family's mean over its tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PROBE_KS: tuple[int, ...] = (1, 2, 5, 10, 20)
"""The k of the k-sparse probes (SAEBench's `k_values` up to 20)."""
TEST_SHARE = 0.2
"""Share of a task's balanced rows held out to score the probe."""
L2 = 1e-3
"""Weight of the L2 penalty on the standardised features' coefficients (mean loss + L2 / 2 * ||w||^2)."""
MIN_CLASS = 8
"""A task with fewer rows than this in either class is not scored (too few to split)."""


@dataclass(frozen=True)
class BinaryTask:
    """One binary probing task: inputs (model activations) and labels."""

    name: str
    x: Tensor
    """[n, d_model] activations at the SAE's hook."""
    y: Tensor
    """[n] bool: whether the row is in the positive class."""
    family: str = ""
    """The dataset the task comes from (its one-vs-rest siblings share it; default: the task's own name)."""

    @property
    def group(self) -> str:
        return self.family or self.name


@dataclass(frozen=True)
class Split:
    """A balanced train/test split of a task's rows."""

    train: Tensor
    """Row indices used to choose latents and fit the probe."""
    test: Tensor
    """Held-out row indices the accuracy is measured on."""


def balanced_split(y: Tensor, seed: int, test_share: float = TEST_SHARE) -> Split | None:
    """Equal numbers of positive and negative rows (the larger class subsampled), each class split train/test
    in `test_share`; None when a class has fewer than MIN_CLASS rows."""
    generator = torch.Generator().manual_seed(seed)
    positives, negatives = torch.nonzero(y).flatten(), torch.nonzero(~y).flatten()
    n = min(len(positives), len(negatives))
    if n < MIN_CLASS:
        return None
    n_test = max(1, round(n * test_share))
    parts = [rows[torch.randperm(len(rows), generator=generator)[:n]] for rows in (positives, negatives)]
    return Split(torch.cat([p[n_test:] for p in parts]), torch.cat([p[:n_test] for p in parts]))


@dataclass(frozen=True)
class LogisticProbe:
    """A fitted logistic regression: the logit is ((x - mean) / std) @ weight + bias."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return ((self.logits(x) > 0) == y).double().mean().item()

    def direction(self) -> Tensor:
        """The probe's direction in the input space (the weight undone of the standardisation)."""
        return self.weight / self.std


def _penalised_loss(features: Tensor, target: Tensor, weights: Tensor, coef: Tensor, l2: float) -> Tensor:
    """Weighted mean logistic loss + L2 / 2 * ||w||^2, the bias (coef's last entry) unpenalised."""
    logits = features @ coef
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weights)
    return loss + 0.5 * l2 * coef[:-1].pow(2).sum()


def fit_logistic(x: Tensor, y: Tensor, l2: float = L2, max_iter: int = 50, balanced: bool = False
                 ) -> LogisticProbe:
    """Logistic regression on standardised features (so the L2 penalty does not depend on their scale), by
    Newton's method with a backtracking line search, in float64 (the penalty makes the loss strictly convex, so
    it converges in a few steps); a constant feature gets weight 0. `balanced`: each class weighs half of the
    loss whatever its size (scikit-learn's `class_weight="balanced"`)."""
    x = x.double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    features = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    target = y.double()
    n_positive = target.sum().clamp(min=1.0)
    weights = (torch.where(y, len(y) / (2 * n_positive), len(y) / (2 * (len(y) - n_positive).clamp(min=1.0)))
               if balanced else torch.ones_like(target))
    penalty = torch.full((features.shape[1],), l2, dtype=torch.float64)
    penalty[-1] = 0.0
    coef = torch.zeros(features.shape[1], dtype=torch.float64)
    loss = _penalised_loss(features, target, weights, coef, l2)
    for _ in range(max_iter):
        p = torch.sigmoid(features @ coef)
        gradient = features.t() @ (weights * (p - target)) / len(x) + penalty * coef
        hessian = (features.t() * (weights * p * (1 - p))) @ features / len(x) + torch.diag(penalty + 1e-10)
        step = torch.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6:
            candidate = coef - scale * step
            candidate_loss = _penalised_loss(features, target, weights, candidate, l2)
            if candidate_loss <= loss:
                break
            scale /= 2
        else:
            break
        converged = (scale * step).abs().max() < 1e-8
        coef, loss = candidate, candidate_loss
        if converged:
            break
    return LogisticProbe(mean, std, coef[:-1], coef[-1])


def mean_difference_latents(latents: Tensor, y: Tensor, k: int) -> Tensor:
    """The k latents with the largest mean over positive rows minus mean over negative rows (signed: latents
    that fire for the class, as SAEBench chooses them)."""
    difference = latents[y].double().mean(dim=0) - latents[~y].double().mean(dim=0)
    return difference.topk(min(k, latents.shape[1])).indices


def dense_accuracy(task: BinaryTask, split: Split) -> float:
    """The ceiling: a probe on every dimension of the raw activations."""
    probe = fit_logistic(task.x[split.train], task.y[split.train])
    return probe.accuracy(task.x[split.test], task.y[split.test])


def sparse_accuracies(latents: Tensor, y: Tensor, split: Split, ks: tuple[int, ...] = PROBE_KS
                      ) -> dict[int, float]:
    """k -> test accuracy of a probe on the k latents chosen by mean difference on the train rows."""
    train, test = split.train, split.test
    accuracies = {}
    for k in ks:
        chosen = mean_difference_latents(latents[train], y[train], k)
        probe = fit_logistic(latents[train][:, chosen], y[train])
        accuracies[k] = probe.accuracy(latents[test][:, chosen], y[test])
    return accuracies


Encode = Callable[[Tensor], Tensor]
"""Raw activations [n, d_model] -> latents [n, d_sae]."""


@dataclass(frozen=True)
class ProbingResult:
    """k-sparse probing over a set of tasks: each task's accuracies, and their means."""

    by_task: dict[str, dict[int, float]]
    """Task -> k -> test accuracy."""
    families: dict[str, str]
    """Task -> its family (`BinaryTask.group`)."""

    def family_means(self, k: int) -> dict[str, float]:
        """Family -> the mean accuracy of its tasks at k."""
        return family_means({name: acc[k] for name, acc in self.by_task.items()}, self.families)

    def mean(self, k: int) -> float:
        """The mean over families of their tasks' mean (SAEBench averages each dataset's classes, then the
        datasets), so 26 one-vs-rest letters weigh as one dataset."""
        return _mean(list(self.family_means(k).values()))


def family_means(values: dict[str, float], families: dict[str, str]) -> dict[str, float]:
    """Family -> the mean of its tasks' values, families in first-seen order."""
    grouped: dict[str, list[float]] = {}
    for name, value in values.items():
        grouped.setdefault(families[name], []).append(value)
    return {family: _mean(members) for family, members in grouped.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def sparse_probing(tasks: list[BinaryTask], encode: Encode, seed: int, ks: tuple[int, ...] = PROBE_KS
                   ) -> ProbingResult:
    """k-sparse probing of one SAE (`encode`) on every task with enough rows in both classes."""
    by_task, encoded = {}, {}
    families = {task.name: task.group for task in tasks}
    for number, task in enumerate(tasks):
        split = balanced_split(task.y, seed + number)
        if split is not None:
            if id(task.x) not in encoded:  # tasks sharing inputs (the 26 first-letter tasks) encode them once
                with torch.no_grad():
                    encoded[id(task.x)] = encode(task.x)
            by_task[task.name] = sparse_accuracies(encoded[id(task.x)], task.y, split, ks)
    return ProbingResult(by_task, {name: families[name] for name in by_task})


def dense_probing(tasks: list[BinaryTask], seed: int) -> dict[str, float]:
    """Task -> the ceiling's test accuracy, on the same splits `sparse_probing` uses with this seed."""
    accuracies = {}
    for number, task in enumerate(tasks):
        split = balanced_split(task.y, seed + number)
        if split is not None:
            accuracies[task.name] = dense_accuracy(task, split)
    return accuracies

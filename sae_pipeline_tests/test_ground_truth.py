"""Ground-truth scores on hand-built cases whose answers are known independently."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sae_pipeline.ground_truth import (
    absorption,
    decoder_matching,
    detection_precision_recall,
    mcc,
    recovery,
    score_against_truth,
    shrinkage,
    split_features,
)

E = torch.eye(3)
P, C, O = 0, 1, 2  # noqa: E741 (parent, child, other feature ids)
PAIRS = torch.tensor([[P, C]])
ROOT2 = math.sqrt(2.0)


def hierarchy_tokens() -> torch.Tensor:
    """Four tokens: the parent alone, parent + child twice, the other feature alone."""
    return torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])


def absorbing_sae(parent_fires_on_first_child_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder whose latent 1 is (parent + child) / sqrt 2, and its latents on `hierarchy_tokens`.

    Token 1: the parent latent is silent and latent 1 writes 0.5 along the parent (>= 0.4 x 1.0): absorbed.
    Token 2: latent 1 writes 0.2 along the parent (< 0.4 x 0.8), so not an absorption event.
    """
    decoder = torch.stack([E[P], (E[P] + E[C]) / ROOT2, E[O]])
    latents = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5 * ROOT2, 0.0], [0.0, 0.2 * ROOT2, 0.0], [0.0, 0.0, 1.0]])
    if parent_fires_on_first_child_token:
        latents[1, 0] = 0.3
    return decoder, latents


def test_a_perfect_sae_scores_perfectly():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 6, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    coefficients = torch.rand(200, 4, generator=generator) * (torch.rand(200, 4, generator=generator) < 0.3)
    order = torch.tensor([4, 0, 5, 2])  # feature f lives in latent order[f]; latents 1 and 3 are random, silent
    decoder = torch.randn(6, 6, generator=generator)
    decoder[order] = 2.0 * directions  # rows of norm 2: latents carry half the coefficient
    latents = torch.zeros(200, 6)
    latents[:, order] = coefficients / 2.0
    pairs = torch.tensor([[0, 1]])
    scores = score_against_truth(directions, coefficients, decoder, latents, pairs)
    assert scores.recovery == pytest.approx(1.0, abs=1e-6) and scores.recovered_share == 1.0
    assert scores.mcc == pytest.approx(1.0, abs=1e-9)
    assert scores.precision == 1.0 and scores.recall == 1.0
    assert scores.absorbed_pairs == 0 and scores.absorption_rate == 0.0
    assert scores.split_features == 0
    assert scores.shrinkage == pytest.approx(1.0, abs=1e-6)
    assert decoder_matching(directions, decoder).tolist() == order.tolist()


def test_recovery_of_rotated_rows_by_hand():
    # feature f's only close row is rotated by angle theta_f in the (e_f, e_3) plane: its cosine is cos(theta_f)
    angles = [0.0, 0.3, 0.5]
    directions = torch.eye(4)[:3]
    decoder = torch.stack([math.cos(a) * torch.eye(4)[f] + math.sin(a) * torch.eye(4)[3]
                           for f, a in enumerate(angles)])
    mean, share = recovery(directions, decoder)
    assert mean == pytest.approx(sum(math.cos(a) for a in angles) / 3)
    assert share == pytest.approx(2 / 3)  # cos 0.3 = 0.955 and cos 0 pass 0.9, cos 0.5 = 0.878 does not


def test_absorption_precision_recall_and_shrinkage_by_hand():
    coefficients = hierarchy_tokens()
    decoder, latents = absorbing_sae()
    match = decoder_matching(E, decoder)
    assert match.tolist() == [0, 1, 2]
    assert absorption(E, coefficients, decoder, latents, PAIRS, match) == (1, 0.5)  # 1 event of 2 child tokens
    precision, recall = detection_precision_recall(coefficients, latents, match)
    # parent: its latent fires once, on a parent token (1/1), and covers 1 of the parent's 3 tokens
    assert precision == pytest.approx(1.0) and recall == pytest.approx((1 / 3 + 1 + 1) / 3)
    # latent 1 (cosine 0.71 with the child) is not a recovered match, so shrinkage averages parent and other: 1
    assert shrinkage(E, coefficients, decoder, latents, match) == pytest.approx(1.0)
    scores = score_against_truth(E, coefficients, decoder, latents, PAIRS)
    assert scores.recovered_share == pytest.approx(2 / 3)
    assert scores.split_features == 0  # a parent's 0.71 cosine with latent 1 is not a split


def test_a_firing_parent_latent_is_not_absorption():
    coefficients = hierarchy_tokens()
    decoder, latents = absorbing_sae(parent_fires_on_first_child_token=True)
    match = decoder_matching(E, decoder)
    assert absorption(E, coefficients, decoder, latents, PAIRS, match) == (0, 0.0)


def test_shrinkage_is_the_write_over_the_coefficient():
    coefficients = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.5]])
    directions = torch.eye(2)
    decoder = torch.eye(2)
    latents = torch.tensor([[0.5, 0.0], [1.0, 1.0], [0.0, 0.5]])
    # feature 0: 0.5/1 and 1/2 -> 0.5; feature 1: 1/1 and 0.5/0.5 -> 1; mean 0.75
    match = decoder_matching(directions, decoder)
    assert shrinkage(directions, coefficients, decoder, latents, match) == pytest.approx(0.75)


def test_mcc_equals_a_brute_force_over_matchings():
    generator = torch.Generator().manual_seed(3)
    coefficients = torch.rand(50, 3, generator=generator) * (torch.rand(50, 3, generator=generator) < 0.5)
    latents = torch.relu(coefficients @ torch.randn(3, 4, generator=generator)
                         + 0.3 * torch.randn(50, 4, generator=generator))
    correlation = np.corrcoef(coefficients.numpy().T, latents.numpy().T)[:3, 3:]
    correlation = np.nan_to_num(correlation)  # a latent that never fires is constant: correlation 0
    best = max(itertools.permutations(range(4), 3), key=lambda cols: sum(correlation[i, j] for i, j in
                                                                        enumerate(cols)))
    expected = np.mean([correlation[i, j] for i, j in enumerate(best)])
    assert mcc(coefficients, latents) == pytest.approx(expected, abs=1e-9)


def test_split_features_counts_features_with_two_close_rows():
    directions = torch.eye(3)
    near = [0.95 * torch.eye(3)[0] + math.sqrt(1 - 0.95**2) * torch.eye(3)[s] for s in (1, 2)]
    decoder = torch.stack([*near, torch.eye(3)[1], torch.eye(3)[2]])
    assert split_features(directions, decoder) == 1  # feature 0: two rows at 0.95; 1 and 2: one row each


def test_a_decoder_smaller_than_the_planted_features_is_refused():
    with pytest.raises(ValueError, match="fewer than the 3 planted features"):
        decoder_matching(torch.eye(3), torch.eye(3)[:2])

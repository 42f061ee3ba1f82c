"""First-letter absorption with SAEBench's definitions, pinned on hand-built words and SAEs whose absorption is
known by construction."""

import math

import pytest
import torch

from sae_pipeline.absorption import (
    F1_JUMP,
    FRACTION_COS,
    FULL_COS,
    PROJECTION_SHARE,
    f1_score,
    first_letter_absorption,
    fit_letter_probes,
    main_latents,
    word_absorption,
    word_split,
)
from sae_pipeline.saes.relu import ReluSAE


def _scores(latents: list[float], cosines: list[float], word: float, main: list[int]):
    result = word_absorption(torch.tensor([latents]), torch.tensor([word]), torch.tensor(cosines),
                             torch.tensor(main, dtype=torch.long))
    return result.fraction.item(), bool(result.full.item())


def test_main_latent_carrying_the_probe_is_no_absorption():
    assert _scores([2.0, 0.0], [1.0, 0.9], word=2.0, main=[0]) == (0.0, False)


def test_silent_main_latent_and_an_aligned_absorber_is_full_absorption():
    # the absorber carries 3 * 0.5 = 1.5 of the word's 2.0 (>= PROJECTION_SHARE): full, fraction 1
    assert _scores([0.0, 3.0], [1.0, 0.5], word=2.0, main=[0]) == (1.0, True)


def test_partial_absorption_fraction_follows_saebench_formula():
    # main carries 0.5 of 1.0; the absorber 0.5 (share 0.5 >= 0.4): fraction = min(0.5, 1 - 0.5) / (0.5 + 0.5)
    fraction, full = _scores([0.5, 1.0], [1.0, 0.5], word=1.0, main=[0])
    assert fraction == pytest.approx(0.5)
    assert not full  # the main latent fires


def test_absorbers_below_the_thresholds_do_not_count():
    weak_share = 0.9 * PROJECTION_SHARE
    assert _scores([0.0, weak_share], [1.0, 1.0], word=1.0, main=[0]) == (0.0, False)
    # aligned below FRACTION_COS: no fraction; still above FULL_COS, and carrying enough: full absorption
    cos = (FULL_COS + FRACTION_COS) / 2
    fraction, full = _scores([0.0, 1.0 / cos], [1.0, cos], word=1.0, main=[0])
    assert (fraction, full) == (0.0, True)
    assert _scores([0.0, 10.0], [1.0, FULL_COS / 2], word=1.0, main=[0]) == (0.0, False)


def test_a_word_the_probe_does_not_project_onto_is_never_absorbed():
    assert _scores([0.0, 3.0], [1.0, 0.5], word=-1.0, main=[0]) == (0.0, False)


def test_f1_and_the_split_rule():
    assert f1_score(torch.tensor([True, True, False]), torch.tensor([True, False, True])) == pytest.approx(0.5)
    y = torch.arange(200) % 2 == 0
    latents = torch.zeros(200, 6)
    latents[y & (torch.arange(200) % 4 == 0), 0] = 3.0  # half the positives
    latents[y & (torch.arange(200) % 4 == 2), 1] = 2.0  # the other half: a split of the same feature
    train, test = torch.arange(200) < 150, torch.arange(200) >= 150
    main = main_latents(latents[train], y[train], latents[test], y[test])
    assert sorted(main.tolist()) == [0, 1]  # the second latent raises F1 by far more than F1_JUMP
    assert F1_JUMP < 0.1


def _planted_words(n_a: int, n_absorbers: int, absorbed_every: int):
    """Words of three letters (a, b, c) as one-hot letter directions times 3, plus a word-specific direction on
    every `absorbed_every`-th a-word; an SAE whose latent a is silenced by those directions while a latent per
    word-specific direction, its decoder half along a, fires instead (absorption by construction)."""
    d_in = 3 + n_absorbers + 4
    letters = torch.cat([torch.zeros(n_a), torch.ones(100), torch.full((100,), 2)]).long()
    x = torch.zeros(len(letters), d_in)
    x[torch.arange(len(letters)), letters] = 3.0
    x[:, 3 + n_absorbers:] = 0.05 * torch.randn(len(letters), 4, generator=torch.Generator().manual_seed(0))
    absorbed = torch.zeros(len(letters), dtype=torch.bool)
    for number, row in enumerate(range(0, n_a, absorbed_every)):
        x[row, 3 + number % n_absorbers] = 3.0
        absorbed[row] = True
    sae = ReluSAE(d_in, 3 + n_absorbers)
    with torch.no_grad():
        sae.W_enc.zero_(), sae.b_enc.zero_(), sae.b_dec.zero_(), sae.W_dec.zero_()
        for letter in range(3):
            sae.W_enc[letter, letter] = 1.0
            sae.W_dec[letter, letter] = 1.0
        for number in range(n_absorbers):
            sae.W_enc[3 + number, 0] = -2.0  # the word-specific direction silences latent a
            sae.W_enc[3 + number, 3 + number] = 1.0
            sae.W_dec[3 + number, 0] = sae.W_dec[3 + number, 3 + number] = 1 / math.sqrt(2)
    return x, letters, absorbed, sae


def test_planted_absorption_is_measured():
    x, letters, absorbed, sae = _planted_words(n_a=400, n_absorbers=40, absorbed_every=10)
    probes = fit_letter_probes(x, letters, "abc", seed=0)
    result = first_letter_absorption(sae, probes)
    by_letter = {r.letter: r for r in result.letters}
    _, test = word_split(letters, seed=0)
    a_test = test[letters[test] == 0]
    assert by_letter["a"].probe_positives == len(a_test)  # the letter is linear in x: the probe finds every word
    assert by_letter["a"].main_latents == [0]
    assert by_letter["a"].absorption_rate == pytest.approx(absorbed[a_test].double().mean().item())
    assert by_letter["a"].absorption_fraction == pytest.approx(by_letter["a"].absorption_rate)
    assert by_letter["b"].absorption_rate == by_letter["c"].absorption_rate == 0.0
    assert result.absorption_rate == pytest.approx(by_letter["a"].absorption_rate / 3)
    assert result.split_latents == 0.0


def test_an_sae_that_keeps_the_feature_has_no_absorption():
    x, letters, _, sae = _planted_words(n_a=400, n_absorbers=40, absorbed_every=10)
    with torch.no_grad():
        sae.W_enc[3:, 0] = 0.0  # latent a fires on every a-word
    result = first_letter_absorption(sae, fit_letter_probes(x, letters, "abc", seed=0))
    assert result.absorption_rate == 0.0
    # the probe direction leans a little toward the word-specific directions, which the still-firing word
    # latents carry: a sliver of partial absorption, against 1/10 of the words absorbed whole above
    assert result.absorption_fraction < 0.01

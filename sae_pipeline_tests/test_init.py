"""Initialisation and optimiser settings of issue 13, item 1: geometric-median b_dec, b_dec_init, Adam betas, idle
latents held through a step, the TopK-family defaults."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from sae_pipeline.config import SAEConfig
from sae_pipeline.saes import ARCHITECTURES, build_sae
from sae_pipeline.saes.base import geometric_median
from sae_pipeline.saes.topk import TopKSAE, topk_latents
from sae_pipeline.step import hold_idle_latents, make_optimizer, training_step
from sae_pipeline.training import B_DEC_SAMPLE, _Member, initial_b_dec, input_transform
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _summed_distance(points: torch.Tensor, y: torch.Tensor) -> float:
    return float((points.double() - y.double()).norm(dim=1).sum())


def test_geometric_median_beats_a_brute_force_grid_in_2d():
    points = torch.randn(9, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 1.0])
    median = geometric_median(points)
    axis = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)  # spacing 0.01
    grid = torch.cartesian_prod(axis, axis)
    totals = torch.cdist(grid, points.double()).sum(dim=1)
    best = grid[totals.argmin()]
    assert _summed_distance(points, median) <= float(totals.min()) + 1e-9
    assert (median.double() - best).norm() < 0.02


def test_geometric_median_is_a_local_minimum_in_many_dimensions():
    points = torch.randn(200, 16, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    median = geometric_median(points).double()
    at_median = _summed_distance(points, median)
    directions = torch.eye(16, dtype=torch.float64)
    for sign, step in itertools.product((1.0, -1.0), (1e-3, 1e-2)):
        for direction in directions:
            assert _summed_distance(points, median + sign * step * direction) >= at_median - 1e-9
    assert at_median < _summed_distance(points, points.double().mean(dim=0))  # the mean is not the median


def test_geometric_median_in_1d_is_the_median_and_ignores_an_outlier():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1e6]])
    assert geometric_median(points).item() == pytest.approx(2.0, abs=1e-3)
    assert points.mean().item() > 1e5


def test_geometric_median_on_a_repeated_point_stays_finite():
    points = torch.tensor([[1.0, 1.0]] * 5 + [[4.0, 0.0], [0.0, 5.0]])
    median = geometric_median(points)
    assert torch.isfinite(median).all()
    assert median.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # a majority at one point is the median


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    data, _ = planted_sparse_data(B_DEC_SAMPLE + 600, 8, 16, 2, seed=2)
    data = data + torch.tensor([3.0] + [0.0] * 7)  # an offset for b_dec to find
    return write_store(tmp_path_factory.mktemp("init"), data[:B_DEC_SAMPLE + 200], data[B_DEC_SAMPLE + 200:],
                       shard_tokens=2048)


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu", "batchtopk", "matryoshka", "gated"])
def test_b_dec_init_of_every_architecture(store, architecture):
    extra = {"topk": {"k": 2}, "batchtopk": {"k": 2}, "matryoshka": {"k": 2, "matryoshka_groups": (0.5, 0.5)},
             "relu": {"l1_alpha": 0.1}, "gated": {"l1_alpha": 0.1}, "jumprelu": {"l0_coeff": 0.1}}[architecture]
    for init in ("geometric_median", "mean", "zero"):
        cfg = SAEConfig(architecture=architecture, expansion_factor=2, b_dec_init=init, **extra)
        transform, _ = input_transform(cfg, store)
        sample = transform(store.sample(B_DEC_SAMPLE, seed=cfg.seed))
        expected = {"geometric_median": geometric_median(sample), "mean": sample.mean(dim=0),
                    "zero": torch.zeros(store.d_model)}[init]
        member = _Member.start(cfg, store, torch.device("cpu"), None, None, None)
        assert torch.allclose(member.sae.b_dec.detach(), expected, atol=1e-6), init
        if init != "zero":
            assert torch.equal(initial_b_dec(cfg, store, transform), expected)
        else:
            assert initial_b_dec(cfg, store, transform) is None


def test_adam_betas_reach_the_optimizer(store):
    cfg = SAEConfig(architecture="topk", k=2, expansion_factor=2, adam_betas=(0.8, 0.95))
    member = _Member.start(cfg, store, torch.device("cpu"), None, None, None)
    assert member.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    with pytest.raises(ValueError, match="adam_betas"):
        SAEConfig(architecture="topk", k=2, adam_betas=(0.9, 1.0))


def test_build_sae_is_unchanged_by_b_dec_init(store):
    """b_dec_init acts in the trainer's initialisation only: the built module and its file layout are the same."""
    a = build_sae(SAEConfig(architecture="topk", k=2, b_dec_init="zero"), 8)
    b = build_sae(SAEConfig(architecture="topk", k=2, b_dec_init="geometric_median"), 8)
    assert a.state_dict().keys() == b.state_dict().keys()


def _warm_topk(seed: int = 0) -> tuple[TopKSAE, torch.optim.Optimizer, torch.Tensor]:
    """A dense-kernel TopK SAE after a few Adam steps on a wide batch (every latent has momentum)."""
    sae = TopKSAE(8, 32, k=2, k_aux=31, kernel="dense")  # AuxK may use every dead latent
    sae.initialize(torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(sae, 1e-2, torch.device("cpu"))
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(seed + 1))
    for _ in range(3):
        training_step(sae, sae, optimizer, x, 0.0, None, 1.0, contextlib.nullcontext())
    return sae, optimizer, x


@pytest.mark.parametrize("hold", [False, True])
def test_idle_latents_keep_their_weights_only_when_held(hold):
    sae, optimizer, x = _warm_topk()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    out = training_step(sae, sae, optimizer, x[:2], 0.0, None, 1.0, contextlib.nullcontext(), hold)
    fired = out.fired()
    assert 0 < int(fired.sum()) < sae.d_sae
    idle_enc_same = torch.equal(before["W_enc"][:, ~fired], sae.W_enc[:, ~fired])
    # the decoder rows are renormalised after every step: a held unit row changes by rounding at most
    idle_dec_same = torch.allclose(before["W_dec"][~fired], sae.W_dec[~fired], rtol=0, atol=1e-6)
    idle_bias_same = torch.equal(before["b_enc"][~fired], sae.b_enc[~fired])
    assert (idle_enc_same, idle_dec_same, idle_bias_same) == (hold,) * 3  # plain Adam moves them by momentum
    assert not torch.equal(before["W_enc"][:, fired], sae.W_enc[:, fired])  # the fired ones learn either way
    assert not torch.equal(before["b_dec"], sae.b_dec)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-6)  # unit rows after the step


def test_latents_trained_by_auxk_alone_are_not_held():
    sae, optimizer, x = _warm_topk(seed=3)
    with torch.no_grad():
        pre = sae.pre_activations(x[:2])
    fired = (topk_latents(pre, sae.k) > 0).any(dim=0)
    dead = ~fired & (pre > 0).any(dim=0)  # positive somewhere, so AuxK gives them a gradient
    assert dead.any()
    before = sae.W_enc.detach().clone()
    training_step(sae, sae, optimizer, x[:2], 0.0, dead, 1.0, contextlib.nullcontext(), True)
    moved = (before != sae.W_enc).any(dim=0)
    assert moved[dead].all()
    assert not moved[~fired & ~dead].any()


def test_topk_family_defaults():
    for architecture in [name for name, cls in ARCHITECTURES.items() if cls.sparsity_field == "k"]:
        cfg = SAEConfig(architecture=architecture, k=8)
        assert (cfg.lr, cfg.lr_warmup_steps, cfg.idle_latents_still) == (4e-3, 100, architecture == "topk")
        assert SAEConfig(architecture=architecture, k=8, lr=1e-3, idle_latents_still=False).lr == 1e-3
    for raw in ({"architecture": "relu", "l1_alpha": 1.0}, {"architecture": "gated", "l1_alpha": 1.0},
                {"architecture": "jumprelu", "l0_coeff": 1.0}):
        cfg = SAEConfig(**raw)
        assert (cfg.lr, cfg.lr_warmup_steps, cfg.idle_latents_still) == (3e-4, 50, False)
    default = SAEConfig(architecture="topk", k=8)
    assert SAEConfig.model_validate_json(default.model_dump_json()) == default  # what a checkpoint stores
    held_off = SAEConfig(architecture="topk", k=8, idle_latents_still=False)
    assert held_off.partition_key() != default.partition_key()


def test_hold_by_index_and_by_where_agree():
    """The CPU path (copy the idle latents only) and the accelerator path (whole copies and a where) are equal."""
    results = []
    for by_index in (True, False):
        sae, optimizer, x = _warm_topk(seed=5)
        sae(x[:3]).loss.backward()
        sae.remove_gradient_parallel_to_decoder()
        with hold_idle_latents(sae, by_index=by_index):
            optimizer.step()
        results.append({name: p.detach().clone() for name, p in sae.named_parameters()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name

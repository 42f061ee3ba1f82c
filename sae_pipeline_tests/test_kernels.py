"""The sparse TopK/BatchTopK training step against the dense reference: selections, loss and every parameter
gradient within 1e-5 (fp32), AuxK with and without dead latents, the trainer's AuxK skip, bf16 autocast,
torch.compile, and the `auto` kernel rule."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.kernels import SparseCode, batch_topk_selection, row_offsets, topk_selection
from sae_pipeline.saes import build_sae
from sae_pipeline.saes.batchtopk import BatchTopKSAE, batch_topk_latents
from sae_pipeline.saes.topk import SPARSE_MAX_DENSITY, TopKSAE, topk_latents
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.step import make_optimizer, training_step
from sae_pipeline.training import steps_until_dead_possible, train_sae
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, D_SAE, BATCH = 24, 96, 64
NO_AUTOCAST = contextlib.nullcontext()


def _pair(cls: type[TopKSAE], k: int = 5, k_aux: int = 12, aux_coeff: float = 0.5, seed: int = 0
          ) -> tuple[TopKSAE, TopKSAE]:
    """A dense and a sparse SAE with identical random weights (non-zero biases, so every term matters)."""
    dense = cls(D_IN, D_SAE, k=k, k_aux=k_aux, aux_coeff=aux_coeff, kernel="dense")
    generator = torch.Generator().manual_seed(seed)
    dense.initialize(generator, b_dec=torch.randn(D_IN, generator=generator))
    with torch.no_grad():
        dense.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=generator))
    sparse = copy.deepcopy(dense)
    sparse.kernel = "sparse"
    return dense, sparse


def _loss_and_grads(sae: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor | None):
    sae.zero_grad(set_to_none=True)
    out = sae(x, 0.0, dead_mask)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


def _dead_mask(kind: str, generator: torch.Generator) -> torch.Tensor | None:
    if kind == "skipped":
        return None
    if kind == "none dead":
        return torch.zeros(D_SAE, dtype=torch.bool)
    if kind == "few dead":  # fewer dead latents than k_aux: the aux top-k also picks live ones, which count 0
        mask = torch.zeros(D_SAE, dtype=torch.bool)
        mask[torch.randperm(D_SAE, generator=generator)[:4]] = True
        return mask
    return torch.rand(D_SAE, generator=generator) < 0.4


# ---------------------------------------------------------------- selection and the CSR code

def test_topk_selection_matches_dense_topk_latents():
    pre = torch.randn(BATCH, D_SAE, generator=torch.Generator().manual_seed(1))
    crow, cols = topk_selection(pre, 7)
    values = torch.relu(pre[SparseCode(crow, cols, pre[:1, :1].flatten(), D_SAE).rows(), cols])
    code = SparseCode(crow, cols, values, D_SAE)
    assert torch.equal(code.to_dense(), topk_latents(pre, 7))
    assert (cols.view(BATCH, 7).diff(dim=1) > 0).all()  # increasing within a row, as CSR wants


def test_batch_topk_selection_matches_dense_batch_topk():
    pre = torch.randn(BATCH, D_SAE, generator=torch.Generator().manual_seed(2))
    crow, cols = batch_topk_selection(pre, 3)
    assert crow[-1] == 3 * BATCH and torch.equal(crow, crow.sort().values)
    rows = SparseCode(crow, cols, cols.float(), D_SAE).rows()
    code = SparseCode(crow, cols, torch.relu(pre[rows, cols]), D_SAE)
    dense = batch_topk_latents(pre, 3)
    assert torch.equal(code.to_dense(), dense)
    assert len(set(crow.diff().tolist())) > 1  # per-token counts vary; the batch averages k


def test_row_offsets_by_hand():
    assert row_offsets(torch.tensor([2, 0, 2, 2]), 4).tolist() == [0, 1, 1, 4, 4]
    assert row_offsets(torch.tensor([], dtype=torch.long), 2).tolist() == [0, 0, 0]


def test_sparse_code_statistics_equal_dense_ones():
    pre = torch.randn(BATCH, D_SAE, generator=torch.Generator().manual_seed(3)) - 2.5  # many non-firing picks
    crow, cols = topk_selection(pre, 6)
    code = SparseCode(crow, cols, torch.relu(pre[SparseCode(crow, cols, pre[0], D_SAE).rows(), cols]), D_SAE)
    dense = code.to_dense()
    assert torch.equal(code.fired(), (dense > 0).any(dim=0))
    assert code.l0().item() == pytest.approx((dense > 0).sum(dim=1).float().mean().item())
    assert 0 < code.l0().item() < 6  # some selected latents do not fire: they are not counted


# ---------------------------------------------------------------- sparse step == dense step

@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("dead", ["skipped", "none dead", "few dead", "many dead"])
def test_sparse_loss_and_gradients_equal_dense(cls, dead):
    dense, sparse = _pair(cls)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, D_IN, generator=generator) * 2 + 0.5
    mask = _dead_mask(dead, generator)
    out_dense, grads_dense = _loss_and_grads(dense, x, mask)
    out_sparse, grads_sparse = _loss_and_grads(sparse, x, mask)
    assert out_sparse.latents is None and out_sparse.code is not None  # no dense [batch, d_sae] code
    assert torch.allclose(out_sparse.dense_latents(), out_dense.latents, atol=1e-6)
    for term in ("loss", "recon_loss", "aux_loss"):
        assert getattr(out_sparse, term).item() == pytest.approx(getattr(out_dense, term).item(), rel=1e-6, abs=1e-6)
    if dead == "many dead":
        assert out_dense.aux_loss.item() > 0.01  # AuxK really contributes in this case
    for name, grad in grads_dense.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grads_sparse[name], grad, atol=1e-5, rtol=0), name
    assert torch.equal(out_sparse.fired(), out_dense.fired())
    assert out_sparse.l0().item() == pytest.approx(out_dense.l0().item())


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_sparse_training_steps_track_dense_ones(cls):
    """Whole optimiser steps (projection, clipping, fused Adam, renorm, BatchTopK's threshold) stay together."""
    dense, sparse = _pair(cls, aux_coeff=1 / 32)
    generator = torch.Generator().manual_seed(5)
    optimisers = [make_optimizer(sae, 1e-3, torch.device("cpu")) for sae in (dense, sparse)]
    mask = torch.rand(D_SAE, generator=generator) < 0.3
    for _ in range(5):
        x = torch.randn(BATCH, D_IN, generator=generator)
        outs = [training_step(sae, sae, opt, x, 0.0, mask, 1.0, NO_AUTOCAST)
                for sae, opt in zip((dense, sparse), optimisers, strict=True)]
        assert outs[1].loss.item() == pytest.approx(outs[0].loss.item(), rel=1e-5)
    for (name, p_dense), p_sparse in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert torch.allclose(p_dense, p_sparse, atol=1e-5), name
    if cls is BatchTopKSAE:
        assert torch.allclose(dense.threshold, sparse.threshold, atol=1e-6) and (sparse.threshold > 0).all()


def test_sparse_step_under_bf16_autocast_is_close_to_fp32():
    reference, sparse = _pair(TopKSAE)
    reference.kernel = "sparse"
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(6))
    fp32 = reference(x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.code.values.dtype == torch.float32
    assert out.loss.item() == pytest.approx(fp32.item(), rel=0.05)
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in sparse.parameters())


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_compiled_step_agrees_with_eager(kernel):
    eager, _ = _pair(TopKSAE, aux_coeff=1 / 32)
    eager.kernel = kernel
    compiled = copy.deepcopy(eager)
    forward = torch.compile(compiled)
    optimisers = [make_optimizer(sae, 1e-3, torch.device("cpu")) for sae in (eager, compiled)]
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(D_SAE, generator=generator) < 0.3
    for _ in range(2):
        x = torch.randn(BATCH, D_IN, generator=generator)
        loss_eager = training_step(eager, eager, optimisers[0], x, 0.0, mask, 1.0, NO_AUTOCAST).loss
        loss_compiled = training_step(compiled, forward, optimisers[1], x, 0.0, mask, 1.0, NO_AUTOCAST).loss
        assert loss_compiled.item() == pytest.approx(loss_eager.item(), rel=1e-5)
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(p_eager, p_compiled, atol=1e-5)


# ---------------------------------------------------------------- kernel choice and config

@pytest.mark.parametrize(("k", "d_sae", "expected"), [(32, 3072, True), (256, 3072, True), (257, 3072, False),
                                                      (512, 3072, False), (16, 1536, True), (128, 1536, True)])
def test_auto_kernel_rule(k, d_sae, expected):
    assert TopKSAE(8, d_sae, k=k).uses_sparse_kernel() is expected
    assert expected == (k <= SPARSE_MAX_DENSITY * d_sae)
    assert TopKSAE(8, d_sae, k=k, kernel="dense").uses_sparse_kernel() is False
    assert TopKSAE(8, d_sae, k=k, kernel="sparse").uses_sparse_kernel() is True


def test_kernel_reaches_the_sae_and_sparse_is_refused_for_other_architectures():
    assert build_sae(SAEConfig(architecture="batchtopk", k=4, kernel="dense"), 16).kernel == "dense"
    assert build_sae(SAEConfig(architecture="matryoshka", k=4, kernel="sparse"), 16).uses_sparse_kernel()
    with pytest.raises(ConfigError, match="kernel: 'sparse' exists for topk, batchtopk, matryoshka, not 'relu'"):
        parse_sae_config({"architecture": "relu", "l1_alpha": 1.0, "kernel": "sparse"})
    with pytest.raises(ConfigError, match="kernel"):
        parse_sae_config({"architecture": "topk", "k": 4, "kernel": "triton"})


# ---------------------------------------------------------------- the trainer: AuxK skipped while nothing is dead

def test_steps_until_dead_possible_by_hand():
    counts = torch.tensor([0, 300, 999])
    assert int(steps_until_dead_possible(counts, dead_window=1000, batch_size=100)) == 0  # 999 + 100 >= 1000
    assert int(steps_until_dead_possible(torch.tensor([0, 250]), 1000, 100)) == 7  # 250 + 7*100 < 1000 <= +800
    assert int(steps_until_dead_possible(torch.tensor([5000]), 1000, 100)) == 0  # already dead
    assert int(steps_until_dead_possible(torch.tensor([0]), 10**12, 1)) == 2**24  # capped, still conservative


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    data, _ = planted_sparse_data(5_000, 16, 32, 2, seed=3)
    return write_store(tmp_path_factory.mktemp("kernels"), data[:4_000], data[4_000:], shard_tokens=1000)


def _train_spying(monkeypatch, cfg: SAEConfig, store, always_mask: bool = False):
    """Train, recording per step whether the SAE got a dead mask and how many latents it marked dead.
    `always_mask` passes the mask every step, as the loop did before issue 11 (the reference)."""
    seen: list[tuple[bool, int]] = []
    forward = TopKSAE.forward

    def spy(self, x, sparsity_coeff=0.0, dead_mask=None):
        seen.append((dead_mask is not None, 0 if dead_mask is None else int(dead_mask.sum())))
        return forward(self, x, sparsity_coeff, dead_mask)

    with monkeypatch.context() as patch:
        patch.setattr(TopKSAE, "forward", spy)
        if always_mask:
            patch.setattr("sae_pipeline.training.steps_until_dead_possible", lambda *_: torch.tensor(0))
        result = train_sae(cfg, store, device="cpu")
    return result, seen


def test_auxk_is_skipped_only_while_no_latent_is_dead(monkeypatch, store):
    # 512 latents, 100 picks a step: some latents go 1,000 tokens (10 steps) without firing
    cfg = SAEConfig(architecture="topk", k=1, expansion_factor=32, batch_size=100, train_tokens=100 * 60,
                    dead_tokens=1_000, log_every=5, aux_coeff=0.5)
    skipping, seen = _train_spying(monkeypatch, cfg, store)
    reference, seen_ref = _train_spying(monkeypatch, cfg, store, always_mask=True)
    assert len(seen) == len(seen_ref) == 60
    assert all(passed for passed, _ in seen_ref)
    assert not any(passed for passed, _ in seen[:10])  # no latent can be 1,000 tokens unfired before step 10
    dead_steps = [step for step, (_, n_dead) in enumerate(seen_ref) if n_dead > 0]
    assert dead_steps and all(seen[step][0] for step in dead_steps)  # never skipped while a latent is dead
    assert sum(passed for passed, _ in seen) < 60  # and skipped for real before that
    for p_skip, p_ref in zip(skipping.sae.parameters(), reference.sae.parameters(), strict=True):
        assert torch.equal(p_skip, p_ref)  # skipping a zero AuxK changes nothing
    assert skipping.metrics.equals(reference.metrics)


def test_auxk_never_runs_when_the_dead_window_exceeds_the_run(monkeypatch, store):
    cfg = SAEConfig(architecture="topk", k=2, expansion_factor=4, batch_size=100, train_tokens=100 * 20,
                    dead_tokens=10**7, log_every=5)
    _, seen = _train_spying(monkeypatch, cfg, store)
    assert not any(passed for passed, _ in seen[:19])  # the window is capped at the run: 2,000 tokens


def test_sparse_and_dense_trainers_reach_the_same_sae(store):
    """The same config trained on both paths: held-out metrics agree (float rounding only)."""
    results = {}
    for kernel in ("sparse", "dense"):
        cfg = SAEConfig(architecture="topk", k=2, expansion_factor=4, batch_size=100, train_tokens=100 * 30,
                        dead_tokens=500, log_every=10, kernel=kernel)
        result = train_sae(cfg, store, device="cpu")
        results[kernel] = (result, evaluate_sae(result.sae, store)[0])
    (sparse, m_sparse), (dense, m_dense) = results["sparse"], results["dense"]
    assert m_sparse.fvu == pytest.approx(m_dense.fvu, rel=1e-3)
    assert m_sparse.dead_fraction == m_dense.dead_fraction
    assert sparse.metrics["aux_loss"].to_list() == pytest.approx(dense.metrics["aux_loss"].to_list(), rel=1e-3,
                                                                 abs=1e-6)
    assert max(dense.metrics["aux_loss"]) > 0  # AuxK did run in this config

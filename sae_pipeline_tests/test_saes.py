"""SAE architectures: the L1 formula (seed 003), normalisation safety, TopK/AuxK, folding, file layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.config import SAEConfig
from sae_pipeline.saes import build_sae, load_sae
from sae_pipeline.saes.base import l1_penalty, normalize_per_token
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.saes.topk import TopKSAE, topk_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_sae(cls, d_in=6, d_sae=20, seed=0, normalize="none", **kwargs):
    sae = cls(d_in, d_sae, normalize, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator, b_dec=torch.randn(d_in, generator=generator))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=generator))
    return sae


# ---------------------------------------------------------------- L1 penalty (seed 003 bug #1)

LATENTS = [
    [0.0, 1.5, 0.0, 2.0, 0.5],
    [3.0, 0.0, 0.0, 0.0, 0.0],
    [0.25, 0.25, 0.25, 0.25, 1.0],
]


def _hand_l1(rows, weights=None):
    per_row = []
    for row in rows:
        total = 0.0
        for j, value in enumerate(row):
            total += abs(value) * (1.0 if weights is None else weights[j])
        per_row.append(total)
    return sum(per_row) / len(per_row)


def test_l1_penalty_sums_over_latents_then_means_over_batch():
    latents = torch.tensor(LATENTS, dtype=torch.float64)
    expected = _hand_l1(LATENTS)  # (4.0 + 3.0 + 2.0) / 3 = 3.0
    assert expected == pytest.approx(3.0)
    assert l1_penalty(latents).item() == pytest.approx(expected, abs=1e-12)
    buggy = sum(abs(v) for row in LATENTS for v in row) / (len(LATENTS) * len(LATENTS[0]))
    assert buggy == pytest.approx(0.6)
    assert l1_penalty(latents).item() != pytest.approx(buggy)
    assert l1_penalty(latents).item() == pytest.approx(buggy * len(LATENTS[0]))


def test_l1_penalty_uses_absolute_values():
    latents = torch.tensor([[-1.0, 2.0], [0.5, -0.5]], dtype=torch.float64)
    assert l1_penalty(latents).item() == pytest.approx((3.0 + 1.0) / 2)


def test_l1_penalty_weighted_by_decoder_norm():
    weights = [1.0, 2.0, 0.5, 3.0, 0.0]
    latents = torch.tensor(LATENTS, dtype=torch.float64)
    expected = _hand_l1(LATENTS, weights)  # (3+4*... ) computed by loops
    got = l1_penalty(latents, torch.tensor(weights, dtype=torch.float64)).item()
    assert got == pytest.approx(expected, abs=1e-12)
    assert got != pytest.approx(_hand_l1(LATENTS))


def test_relu_forward_sparsity_loss_uses_summed_l1():
    sae = _random_sae(ReluSAE, d_in=4, d_sae=12, seed=1)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    out = sae(x, sparsity_coeff=0.5)
    z = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    assert out.sparsity_loss.item() == pytest.approx(0.5 * z.abs().sum(dim=1).mean().item(), rel=1e-6)
    recon = ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum(dim=1).mean().item()
    assert out.recon_loss.item() == pytest.approx(recon, rel=1e-5)
    assert out.loss.item() == pytest.approx(recon + out.sparsity_loss.item(), rel=1e-5)
    assert out.aux_loss.item() == 0.0
    # decoder-norm weighting: scale decoder rows, penalty scales per latent
    weighted = _random_sae(ReluSAE, d_in=4, d_sae=12, seed=1, weight_l1_by_decoder_norm=True)
    with torch.no_grad():
        weighted.W_dec.mul_(torch.arange(1, 13, dtype=torch.float32)[:, None])
    out = weighted(x, sparsity_coeff=1.0)
    norms = weighted.W_dec.detach().norm(dim=1)
    assert out.sparsity_loss.item() == pytest.approx((z * norms).sum(dim=1).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- normalisation (seed 003 bug #2)

def test_normalize_per_token_rows_get_norm_sqrt_d():
    x = torch.randn(10, 9, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 10)[:, None]
    scaled, factor = normalize_per_token(x)
    assert torch.allclose(scaled.norm(dim=1), torch.full((10,), 3.0), rtol=1e-5)
    assert torch.allclose(scaled, x * factor)
    # direction preserved
    cos = torch.nn.functional.cosine_similarity(scaled, x, dim=1)
    assert torch.allclose(cos, torch.ones(10), atol=1e-6)


def test_normalize_per_token_zero_vector_is_finite_zero():
    x = torch.zeros(3, 8)
    x[1] = torch.arange(8.0)
    scaled, factor = normalize_per_token(x)
    assert torch.isfinite(scaled).all() and torch.isfinite(factor).all()
    assert torch.equal(scaled[0], torch.zeros(8)) and torch.equal(scaled[2], torch.zeros(8))
    assert scaled[1].norm().item() == pytest.approx(math.sqrt(8), rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_normalize_per_token_non_finite_raises(bad):
    x = torch.ones(4, 5)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"normalize_per_token: 1 row\(s\) contain NaN or Inf"):
        normalize_per_token(x)


def test_per_token_sae_reconstruct_zero_row_is_finite():
    sae = _random_sae(TopKSAE, normalize="per_token", k=3)
    x = torch.randn(4, 6)
    x[0] = 0.0
    x_hat, latents = sae.reconstruct(x)
    assert torch.isfinite(x_hat).all() and torch.isfinite(latents).all()


# ---------------------------------------------------------------- TopK and AuxK

def test_topk_encode_keeps_k_largest_relu_preactivations():
    sae = _random_sae(TopKSAE, d_in=6, d_sae=20, k=4)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    latents = sae.encode(x).detach()
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    assert (latents >= 0).all()
    for row in range(len(x)):
        order = sorted(range(20), key=lambda j: -pre[row, j].item())
        top = order[:4]
        expected = torch.zeros(20)
        for j in top:
            expected[j] = max(pre[row, j].item(), 0.0)
        assert torch.allclose(latents[row], expected), row
        assert int((latents[row] > 0).sum()) == sum(1 for j in top if pre[row, j] > 0)


def test_topk_latents_negative_preactivations_stay_zero():
    pre = torch.tensor([[-1.0, -2.0, 3.0, -0.5], [5.0, 4.0, 3.0, 2.0]])
    assert torch.equal(topk_latents(pre, 2), torch.tensor([[0.0, 0.0, 3.0, 0.0], [5.0, 4.0, 0.0, 0.0]]))


def test_auxk_zero_without_dead_latents_positive_with_some():
    sae = _random_sae(TopKSAE, d_in=6, d_sae=20, k=2, aux_coeff=0.5)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(4))
    none_dead = sae(x, dead_mask=torch.zeros(20, dtype=torch.bool))
    assert none_dead.aux_loss.item() == 0.0
    assert none_dead.loss.item() == pytest.approx(none_dead.recon_loss.item(), rel=1e-7)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[5:15] = True
    some_dead = sae(x, dead_mask=dead)
    assert some_dead.aux_loss.item() > 0.0
    some_dead.aux_loss.backward()
    # the aux loss gives gradient to dead latents' encoder columns only (live ones are masked out)
    assert sae.W_enc.grad[:, 5:15].abs().sum() > 0
    assert sae.W_enc.grad[:, :5].abs().sum() == 0 and sae.W_enc.grad[:, 15:].abs().sum() == 0
    off = _random_sae(TopKSAE, d_in=6, d_sae=20, k=2, aux_coeff=0.0)
    assert off(x, dead_mask=dead).aux_loss.item() == 0.0


def test_auxk_value_matches_reference():
    sae = _random_sae(TopKSAE, d_in=6, d_sae=20, k=2, k_aux=3, aux_coeff=1.0)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4]] = True  # 2 dead < k_aux=3 -> scale 2/3
    out = sae(x, dead_mask=dead)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        residual = x - out.x_hat
        aux = torch.zeros_like(pre)
        aux[:, [1, 4]] = torch.relu(pre[:, [1, 4]])
        residual_hat = aux @ sae.W_dec
        # in recon_loss's units: squared error summed over d_in, averaged over the batch (Gao et al.)
        expected = (2 / 3) * ((residual_hat - residual) ** 2).sum() / len(x)
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- folding, gradient projection

@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("scale", [0.05, 7.3])
def test_fold_scaling_factor(arch, scale):
    sae = _random_sae(ReluSAE, seed=6) if arch == "relu" else _random_sae(TopKSAE, seed=6, k=3)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        x_hat_scaled, latents_scaled = sae.reconstruct(scale * x)
        sae.fold_scaling_factor(scale)
        x_hat, latents = sae.reconstruct(x)
    assert torch.allclose(latents, latents_scaled, atol=1e-5)
    assert torch.allclose(x_hat, x_hat_scaled / scale, atol=1e-5)
    assert (latents > 0).any()


def test_remove_gradient_parallel_to_decoder():
    sae = _random_sae(ReluSAE, d_in=6, d_sae=20, seed=8)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(9))
    sae(x, sparsity_coeff=0.1).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder()
    after = sae.W_dec.grad
    dots = (after * sae.W_dec.detach()).sum(dim=1)
    assert dots.abs().max().item() < 1e-6
    # only the parallel component was removed: the difference is along each decoder row
    w = sae.W_dec.detach()
    expected = before - (before * w).sum(dim=1, keepdim=True) * w
    assert torch.allclose(after, expected, atol=1e-6)
    assert (before * w).sum(dim=1).abs().max().item() > 1e-4  # the test had something to remove


def test_set_decoder_norm_to_unit():
    sae = _random_sae(ReluSAE)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.1, 5, 20)[:, None])
    sae.set_decoder_norm_to_unit()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(20), atol=1e-6)


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("normalize", ["dataset", "per_token"])
def test_save_load_round_trip(tmp_path, arch, normalize):
    cfg = SAEConfig(architecture=arch, k=3 if arch == "topk" else None,
                    l1_alpha=0.1 if arch == "relu" else None, expansion_factor=3, normalize=normalize)
    sae = build_sae(cfg, 6)
    generator = torch.Generator().manual_seed(10)
    sae.initialize(generator, b_dec=torch.randn(6, generator=generator))
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(18, generator=generator))
    sae.save(tmp_path, {"key": cfg.partition_key()})
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(sae)
    x = torch.randn(25, 6, generator=generator) * 4
    with torch.no_grad():
        expected, expected_latents = sae.reconstruct(x)
        got, got_latents = loaded.reconstruct(x)
    assert torch.allclose(got, expected, atol=1e-6) and torch.equal(got_latents > 0, expected_latents > 0)
    if normalize == "per_token":  # the loader must re-apply per-token normalisation stated in cfg.json
        assert loaded.normalize == "per_token"

    cfg_json = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "apply_b_dec_to_input", "normalize_activations"):
        assert key in cfg_json, key
    assert cfg_json["d_in"] == 6 and cfg_json["d_sae"] == 18
    assert cfg_json["apply_b_dec_to_input"] is True
    assert cfg_json["normalize_activations"] == ("constant_norm_rescale" if normalize == "per_token" else "none")
    assert cfg_json["architecture"] == ("topk" if arch == "topk" else "standard")
    assert cfg_json["metadata"] == {"key": cfg.partition_key()}
    if arch == "topk":
        assert cfg_json["k"] == 3
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == {
        "W_enc": [6, 18], "b_enc": [18], "W_dec": [18, 6], "b_dec": [6]}
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert torch.equal(weights["W_dec"], sae.W_dec.detach())

"""BatchTopK, JumpReLU and Gated SAEs: learning on planted directions, STE gradients by hand, running threshold,
dataset-scaling fold, SAELens file layout and round trip through `load_sae`, config validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.evaluation import evaluate_sae
from sae_pipeline.saes import ARCHITECTURES, build_sae, load_sae
from sae_pipeline.saes.batchtopk import BatchTopKSAE, batch_topk_latents, min_kept_activation
from sae_pipeline.saes.gated import GatedSAE
from sae_pipeline.saes.jumprelu import TARGET_GAIN, JumpReLUFunction, JumpReLUSAE, StepFunction
from sae_pipeline.spec_errors import parse_sae_config
from sae_pipeline.training import CHECKPOINT_FILE, sparsity_coefficient, train_sae
from sae_pipeline_tests.synthetic import (
    PLANTED_D,
    PLANTED_DIRECTIONS,
    PLANTED_K,
    PLANTED_RUN,
    planted_sparse_data,
    planted_store,
    recovery_score,
    write_store,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, N_DIRS, K_ACTIVE, RUN = PLANTED_D, PLANTED_DIRECTIONS, PLANTED_K, PLANTED_RUN


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted"))


def _train(planted, **fields):
    store, directions = planted
    result = train_sae(SAEConfig(**RUN, **fields), store, device="cpu")
    metrics, _ = evaluate_sae(result.sae, store)
    score = recovery_score(result.sae.W_dec.detach(), directions)
    print(f"{fields['architecture']} recovery {score:.4f} l0 {metrics.l0:.3f} fvu {metrics.fvu:.4f}")
    return result, metrics, score


def _random(arch: str, d_in=6, d_sae=20, seed=0, normalize="none", **kwargs):
    sae = ARCHITECTURES[arch](d_in, d_sae, normalize, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator, b_dec=torch.randn(d_in, generator=generator))
    with torch.no_grad():
        for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
            if hasattr(sae, name):
                getattr(sae, name).copy_(0.3 * torch.randn(d_sae, generator=generator))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.copy_(0.2 + 0.3 * torch.rand(d_sae, generator=generator))
        if arch == "jumprelu":
            sae.log_threshold.copy_((0.2 + 0.3 * torch.rand(d_sae, generator=generator)).log())
    return sae


ARCH_KWARGS = {"batchtopk": {"k": 3}, "jumprelu": {}, "gated": {}, "matryoshka": {"k": 3, "widths": [4, 10, 20]}}


# ---------------------------------------------------------------- learning on planted sparse directions

def test_batchtopk_learns_and_runs_as_jumprelu_at_inference(planted):
    result, metrics, score = _train(planted, architecture="batchtopk", k=K_ACTIVE)
    assert score > 0.9  # measured 0.98
    assert result.metrics["l0"].to_list() == pytest.approx([K_ACTIVE] * len(result.metrics))  # k*B per batch
    # inference uses the learnt threshold, not the batch: L0 within 15 % of k (measured 2.93)
    assert 0.85 * K_ACTIVE <= metrics.l0 <= 1.15 * K_ACTIVE
    assert metrics.fvu < 0.15
    sae = result.sae
    assert not sae.training and (sae.threshold > 0).all()
    assert torch.equal(sae.threshold, sae.threshold[0].expand_as(sae.threshold))  # one scalar estimate


def test_jumprelu_learns_and_reaches_target_l0(planted):
    target = K_ACTIVE / (RUN["expansion_factor"] * D)  # 3 latents of 128, as a fraction
    result, metrics, score = _train(planted, architecture="jumprelu", l0_coeff=10.0, target_l0=target,
                                    jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.5)
    assert score > 0.9  # measured 0.99
    assert abs(metrics.l0 - K_ACTIVE) <= 0.15 * K_ACTIVE  # measured 3.04 (3.17 before the threshold controller)
    assert metrics.fvu < 0.15
    assert result.metrics["sparsity_loss"].to_list()[-1] < 0.1  # (L0/target - 1)^2 * 10 near its minimum


@pytest.mark.parametrize("active", [4, 12])
def test_jumprelu_trains_to_its_target_with_default_settings(planted, active):
    """No tuning: l0_coeff 1 and the default init threshold (1e-3) and bandwidth, with which the code before the
    controller ended at held-out L0 75 of 128 for both targets, one latent on 99 % of tokens. Two targets, ±10 % on
    held-out tokens, no latent on > 50 % of them."""
    d_sae = RUN["expansion_factor"] * D
    result, metrics, _ = _train(planted, architecture="jumprelu", l0_coeff=1.0, target_l0=active / d_sae)
    assert abs(metrics.l0 - active) <= 0.1 * active, metrics.l0  # measured 3.94 and 11.76
    _, fire_counts = evaluate_sae(result.sae, planted[0])
    assert fire_counts.max().item() / metrics.n_tokens <= 0.5
    assert result.sae.log_threshold_shift.item() > 3  # the controller, not Adam, lifted the thresholds from 1e-3


def test_jumprelu_first_step_calibrates_the_shift_then_the_controller_steers():
    sae = _random("jumprelu", d_in=6, d_sae=20, seed=3, target_l0=4.0)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(4))
    out = sae(x)
    assert (out.latents > 0).sum().item() > 4 * 12  # fires more than the target: calibration moves s up
    with torch.no_grad():  # by hand: the 49th largest log(pre / theta) among firing entries, in float64
        pre, theta = sae.pre_activations(x).double(), sae.threshold.detach().double()
        ratios = sorted((torch.log(pre[pre > theta] / theta.expand_as(pre)[pre > theta])).tolist(), reverse=True)
    sae.after_step(out)
    assert sae.log_threshold_shift.item() == pytest.approx(ratios[4 * 12], rel=1e-5)
    with torch.no_grad():  # the same batch through the calibrated thresholds fires exactly target * batch times
        assert (sae(x).latents > 0).sum().item() == 4 * 12

    x2 = torch.randn(12, 6, generator=torch.Generator().manual_seed(5))
    out2 = sae(x2)
    l0 = (out2.latents > 0).sum(dim=1).float().mean().item()
    before = sae.log_threshold_shift.item()
    sae.after_step(out2)  # every later step: the integral controller
    step = TARGET_GAIN * math.log((l0 + 1) / (4.0 + 1))
    assert sae.log_threshold_shift.item() - before == pytest.approx(step, rel=1e-5, abs=1e-7)

    resumed = _random("jumprelu", d_in=6, d_sae=20, seed=9, target_l0=4.0)
    resumed.load_state_dict(sae.state_dict())  # a resumed run is not calibrated again
    shift = resumed.log_threshold_shift.item()
    out3 = resumed(x2)
    resumed.after_step(out3)
    l0 = (out3.latents > 0).sum(dim=1).float().mean().item()
    assert resumed.log_threshold_shift.item() - shift == pytest.approx(
        TARGET_GAIN * math.log((l0 + 1) / 5), rel=1e-5, abs=1e-7)

    untargeted = _random("jumprelu", d_in=6, d_sae=20, seed=3)
    untargeted.after_step(untargeted(x))
    assert untargeted.log_threshold_shift.item() == 0  # without a target nothing steers


def test_jumprelu_plain_l0_penalty_learns(planted):
    _, metrics, score = _train(planted, architecture="jumprelu", l0_coeff=3.0, jumprelu_bandwidth=0.3,
                               jumprelu_init_threshold=0.5)
    assert score > 0.9  # measured 0.99
    assert K_ACTIVE / 1.5 <= metrics.l0 <= 1.5 * K_ACTIVE  # measured 2.86


def test_gated_learns(planted):
    _, metrics, score = _train(planted, architecture="gated", l1_alpha=5.0)
    assert score > 0.9  # measured 0.99
    assert K_ACTIVE / 1.5 <= metrics.l0 <= 1.5 * K_ACTIVE  # measured 2.90
    assert metrics.fvu < 0.2


# ---------------------------------------------------------------- BatchTopK selection and running threshold

def test_batch_topk_keeps_k_times_batch_largest_over_the_batch():
    pre = torch.tensor([[5.0, -1.0, 0.5, 4.0], [0.1, 3.0, 0.2, -2.0], [6.0, 2.5, 0.0, 0.3]])
    latents = batch_topk_latents(pre, 2)  # keep the 6 largest of the batch: 6, 5, 4, 3, 2.5, 0.5
    expected = torch.tensor([[5.0, 0.0, 0.5, 4.0], [0.0, 3.0, 0.0, 0.0], [6.0, 2.5, 0.0, 0.0]])
    assert torch.equal(latents, expected)
    assert [int(n) for n in (latents > 0).sum(dim=1)] == [3, 1, 2]  # per token varies, the batch averages k
    assert min_kept_activation(latents).item() == 0.5
    assert min_kept_activation(torch.zeros(2, 3)).item() == 0.0


def test_running_threshold_by_hand():
    sae = BatchTopKSAE(4, 8, k=1, threshold_decay=0.9)
    assert (sae.threshold == -1).all()  # not estimated yet: eval encode is a plain ReLU
    sae.update_threshold(torch.tensor([[0.0, 2.0], [0.7, 0.0]]))
    assert torch.allclose(sae.threshold, torch.full((8,), 0.7))  # the first estimate is taken outright
    sae.update_threshold(torch.tensor([[1.7, 0.0], [0.0, 3.0]]))
    assert torch.allclose(sae.threshold, torch.full((8,), 0.9 * 0.7 + 0.1 * 1.7))
    sae.update_threshold(torch.zeros(2, 2))  # nothing fired: pulls toward 0
    assert torch.allclose(sae.threshold, torch.full((8,), 0.9 * (0.9 * 0.7 + 0.1 * 1.7)))


def test_running_threshold_gives_about_k_per_token_at_inference():
    """With fixed weights the EMA converges to the mean k*B-th largest activation; as a JumpReLU at that
    threshold the SAE keeps about k latents per token on fresh data."""
    sae = _random("batchtopk", d_in=16, d_sae=64, k=4, seed=1)
    sae.threshold.fill_(-1.0)
    generator = torch.Generator().manual_seed(2)
    sae.train()
    with torch.no_grad():
        for _ in range(300):
            out = sae(torch.randn(128, 16, generator=generator))
            assert (out.dense_latents() > 0).sum().item() == 4 * 128
            sae.after_step(out)
        sae.eval()
        l0 = (sae.encode(torch.randn(8192, 16, generator=generator)) > 0).sum(dim=1).float().mean().item()
    assert l0 == pytest.approx(4, rel=0.05)


def test_batchtopk_auxk_is_topks():
    sae = _random("batchtopk", d_in=6, d_sae=20, k=2, aux_coeff=1.0)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    assert sae(x, dead_mask=torch.zeros(20, dtype=torch.bool)).aux_loss.item() == 0.0
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4, 9]] = True
    out = sae(x, dead_mask=dead)
    pre = sae.pre_activations(x)
    assert out.aux_loss.item() == pytest.approx(sae.aux_loss(x, out.x_hat, pre, dead).item(), rel=1e-6)
    assert out.aux_loss.item() > 0
    assert out.loss.item() == pytest.approx(out.recon_loss.item() + out.aux_loss.item(), rel=1e-6)


class _Stop(Exception):
    """Raised by a training log hook: the run ends there, after its step-10 checkpoint, as a kill would."""


def stop_at_15(row: dict) -> None:
    if row["step"] >= 15:
        raise _Stop


def test_a_jumprelu_checkpoint_from_before_the_controller_resumes_and_calibrates(tmp_path):
    """Checkpoints written before `log_threshold_shift` existed load with s = 0; the next step calibrates s."""
    data, _ = planted_sparse_data(1_300, 8, 16, 2, seed=1)
    store = write_store(tmp_path / "store", data[:1_000], data[1_000:], shard_tokens=300)
    cfg = SAEConfig(architecture="jumprelu", expansion_factor=4, batch_size=32, train_tokens=32 * 20, l0_coeff=1.0,
                    target_l0=0.125, lr=2e-3, lr_warmup_steps=3, checkpoint_every=10, log_every=5, dead_tokens=64)
    with pytest.raises(_Stop):
        train_sae(cfg, store, device="cpu", checkpoint_dir=tmp_path / "c", log=stop_at_15)
    path = tmp_path / "c" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    del state["sae"]["log_threshold_shift"]  # what the code before the controller wrote
    torch.save(state, path)
    resumed = train_sae(cfg, store, device="cpu", checkpoint_dir=tmp_path / "c")
    assert resumed.resumed_from_step == 10
    assert resumed.sae.log_threshold_shift.item() != 0  # calibrated on its first resumed step


THRESHOLD_STATE = {"batchtopk": ({"k": 2}, "threshold"), "matryoshka": ({"k": 2}, "threshold"),
                   "jumprelu": ({"l0_coeff": 1.0, "target_l0": 0.125}, "log_threshold_shift")}
"""Per architecture: its fields, and the state outside the optimiser that a checkpoint must carry."""


@pytest.mark.parametrize("arch", list(THRESHOLD_STATE))
def test_training_updates_threshold_and_resume_restores_it(tmp_path, arch):
    data, _ = planted_sparse_data(1_300, 8, 16, 2, seed=1)
    store = write_store(tmp_path / "store", data[:1_000], data[1_000:], shard_tokens=300)
    fields, state = THRESHOLD_STATE[arch]
    cfg = SAEConfig(architecture=arch, expansion_factor=4, batch_size=32, train_tokens=32 * 30, **fields,
                    lr=2e-3, lr_warmup_steps=3, checkpoint_every=10, log_every=5, dead_tokens=64, seed=4)
    reference = train_sae(cfg, store, device="cpu")
    assert (reference.sae.threshold > 0).all()
    assert getattr(reference.sae, state).abs().sum() > 0  # the step moved it

    with pytest.raises(_Stop):
        train_sae(cfg, store, device="cpu", checkpoint_dir=tmp_path / "ckpt", log=stop_at_15)
    assert state in torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)["sae"]
    resumed = train_sae(cfg, store, device="cpu", checkpoint_dir=tmp_path / "ckpt")
    assert resumed.resumed_from_step == 10
    assert torch.allclose(resumed.sae.threshold, reference.sae.threshold, atol=1e-5)
    assert resumed.metrics["l0"].to_list() == pytest.approx(reference.metrics["l0"].to_list(), abs=1e-5)


# ---------------------------------------------------------------- JumpReLU straight-through estimator

PRE = [[0.90, 1.02, 0.31, -0.4], [1.04, 0.50, 0.27, 2.0], [0.96, 1.20, 0.10, 0.62]]
THETA = [1.0, 1.1, 0.3, 0.5]
EPS = 0.1


def _rect(u: float) -> float:
    return 1.0 if -0.5 < u < 0.5 else 0.0


def test_jumprelu_ste_gradients_by_hand():
    pre = torch.tensor(PRE, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, 1.0, 2.0, 1.0], [-2.0, 0.7, 1.5, 1.0]], dtype=torch.float64)
    out = JumpReLUFunction.apply(pre, theta, EPS)
    (out * upstream).sum().backward()
    for b, row in enumerate(PRE):
        for i, value in enumerate(row):
            fired = 1.0 if value > THETA[i] else 0.0
            assert out[b, i].item() == pytest.approx(value * fired)
            assert pre.grad[b, i].item() == pytest.approx(upstream[b, i].item() * fired)
    for i, t in enumerate(THETA):
        expected = sum(-(t / EPS) * _rect((row[i] - t) / EPS) * upstream[b, i].item() for b, row in enumerate(PRE))
        assert theta.grad[i].item() == pytest.approx(expected, abs=1e-12), i
    # the kernel saw something: latents 0-2 within eps/2 of theta in some rows, latent 3 in none
    assert theta.grad[0].item() != 0 and theta.grad[2].item() != 0 and theta.grad[3].item() == 0


def test_step_ste_gradients_by_hand():
    pre = torch.tensor(PRE, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    h = StepFunction.apply(pre, theta, EPS)
    l0 = h.sum(dim=1).mean()
    l0.backward()
    assert l0.item() == pytest.approx(sum(v > THETA[i] for row in PRE for i, v in enumerate(row)) / len(PRE))
    assert torch.equal(pre.grad, torch.zeros_like(pre))  # no gradient to pre through the step
    for i, t in enumerate(THETA):
        expected = sum(-(1 / EPS) * _rect((row[i] - t) / EPS) for row in PRE) / len(PRE)
        assert theta.grad[i].item() == pytest.approx(expected, abs=1e-12), i


def test_jumprelu_l0_penalty_and_target_by_hand():
    sae = _random("jumprelu", d_in=6, d_sae=20, seed=3, bandwidth=0.2)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    out = sae(x, sparsity_coeff=0.5)
    with torch.no_grad():
        pre = sae.pre_activations(x)
        theta = sae.log_threshold.exp()
        fired = (pre > theta).float()
        l0 = fired.sum(dim=1).mean().item()
    assert torch.allclose(out.latents, pre * fired)
    assert out.sparsity_loss.item() == pytest.approx(0.5 * l0, rel=1e-6)
    out.sparsity_loss.backward()  # d/d log theta = theta * d/d theta
    expected = -0.5 * theta / 0.2 * (((pre - theta) / 0.2).abs() < 0.5).float().sum(dim=0) / len(x)
    assert torch.allclose(sae.log_threshold.grad, expected, atol=1e-6)
    assert _grad(sae.W_enc) == 0 and _grad(sae.b_enc) == 0  # L0 reaches only the thresholds

    targeted = _random("jumprelu", d_in=6, d_sae=20, seed=3, bandwidth=0.2, target_l0=2.0)
    assert targeted(x, sparsity_coeff=0.5).sparsity_loss.item() == pytest.approx(0.5 * (l0 / 2.0 - 1) ** 2, rel=1e-6)


def test_jumprelu_sparsity_coefficient_is_l0_coeff_with_warmup():
    cfg = SAEConfig(architecture="jumprelu", l0_coeff=0.8, l1_warmup_steps=4)
    assert [sparsity_coefficient(cfg, s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    assert sparsity_coefficient(SAEConfig(architecture="batchtopk", k=2), 0) == 0.0
    assert sparsity_coefficient(SAEConfig(architecture="gated", l1_alpha=0.3), 0) == 0.3


# ---------------------------------------------------------------- Gated

def test_gated_forward_by_hand_and_gradient_routes():
    sae = _random("gated", d_in=6, d_sae=20, seed=5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 20)[:, None])  # non-unit rows: the L1 weighting shows
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(6))
    out = sae(x, sparsity_coeff=0.7)
    with torch.no_grad():
        centred = x - sae.b_dec
        pi_gate = centred @ sae.W_enc + sae.b_gate
        pi_mag = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        z = (pi_gate > 0).float() * pi_mag.clamp(min=0)
        x_hat = z @ sae.W_dec + sae.b_dec
        norms = sae.W_dec.norm(dim=1)
        sparsity = 0.7 * (pi_gate.clamp(min=0) * norms).sum(dim=1).mean()
        aux = ((pi_gate.clamp(min=0) @ sae.W_dec + sae.b_dec - x) ** 2).sum(dim=1).mean()
        recon = ((x_hat - x) ** 2).sum(dim=1).mean()
    assert torch.allclose(out.latents, z, atol=1e-6) and torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert out.sparsity_loss.item() == pytest.approx(sparsity.item(), rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((recon + sparsity + aux).item(), rel=1e-5)
    assert 0 < (z > 0).float().mean() < 1

    out.recon_loss.backward(retain_graph=True)  # the gate gets nothing from reconstruction
    assert _grad(sae.b_gate) == 0 and _grad(sae.b_mag) > 0 and _grad(sae.r_mag) > 0
    sae.zero_grad()
    out.aux_loss.backward()  # the auxiliary loss trains the gate, not the (detached) decoder
    assert _grad(sae.b_gate) > 0 and _grad(sae.W_dec) == 0
    assert _grad(sae.b_dec) > 0  # through the centring x - b_dec only


def _grad(p: torch.Tensor) -> float:
    return 0.0 if p.grad is None else p.grad.abs().sum().item()


# ---------------------------------------------------------------- fold and file layout

@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "gated", "matryoshka"])
@pytest.mark.parametrize("scale", [0.05, 7.3])
def test_fold_scaling_factor_keeps_thresholds_consistent(arch, scale):
    sae = _random(arch, seed=6, **ARCH_KWARGS[arch]).eval()
    thresholds_before = getattr(sae, "threshold", torch.zeros(1)).detach().clone()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(7)) * 2
    with torch.no_grad():
        x_hat_scaled, latents_scaled = sae.reconstruct(scale * x)
        train_scaled = sae.train()(scale * x).dense_latents()
        sae.eval().fold_scaling_factor(scale)
        x_hat, latents = sae.reconstruct(x)
        train_raw = sae.train()(x).dense_latents()
    assert torch.allclose(latents, latents_scaled, atol=1e-5)
    assert torch.allclose(x_hat, x_hat_scaled / scale, atol=1e-5)
    assert torch.allclose(train_raw, train_scaled, atol=1e-5)
    assert (latents > 0).any() and (latents_scaled == 0).any()  # the thresholds / gates cut something
    # the fold leaves pre-activations unchanged (W_enc * f on x / f...), so thresholds on them stay put
    assert torch.equal(getattr(sae, "threshold", torch.zeros(1)).detach(), thresholds_before)


FILE_KEYS = {
    "batchtopk": ({"W_enc": [6, 18], "b_enc": [18], "W_dec": [18, 6], "b_dec": [6], "threshold": [18]}, "jumprelu"),
    "jumprelu": ({"W_enc": [6, 18], "b_enc": [18], "W_dec": [18, 6], "b_dec": [6], "threshold": [18]}, "jumprelu"),
    "gated": ({"W_enc": [6, 18], "b_gate": [18], "r_mag": [18], "b_mag": [18], "W_dec": [18, 6], "b_dec": [6]},
              "gated"),
}
CONFIGS = {"batchtopk": {"k": 3}, "jumprelu": {"l0_coeff": 0.1, "jumprelu_bandwidth": 0.05, "target_l0": 0.1},
           "gated": {"l1_alpha": 0.1}}


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "gated"])
@pytest.mark.parametrize("normalize", ["dataset", "per_token"])
def test_save_load_round_trip(tmp_path, arch, normalize):
    cfg = SAEConfig(architecture=arch, expansion_factor=3, normalize=normalize, **CONFIGS[arch])
    sae = build_sae(cfg, 6)
    generator = torch.Generator().manual_seed(10)
    sae.initialize(generator, b_dec=torch.randn(6, generator=generator))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.ndim == 1 and name != "b_dec":
                p.copy_(0.2 * torch.randn(18, generator=generator) + (-1.5 if name == "log_threshold" else 0.0))
        if arch == "batchtopk":
            sae.threshold.fill_(0.15)
        if arch == "jumprelu":
            sae.log_threshold_shift.fill_(0.3)  # the controller's shift is part of the saved threshold
    sae.eval().save(tmp_path, {"key": cfg.partition_key()})
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(sae) is {"batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE, "gated": GatedSAE}[arch]
    assert not loaded.training
    x = torch.randn(25, 6, generator=generator) * 4
    with torch.no_grad():
        expected, expected_latents = sae.reconstruct(x)
        got, got_latents = loaded.reconstruct(x)
    assert torch.allclose(got, expected, atol=1e-6) and torch.equal(got_latents > 0, expected_latents > 0)
    assert (expected_latents == 0).any() and (expected_latents > 0).any()

    keys, saelens_arch = FILE_KEYS[arch]
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == keys
    assert all(v.dtype == torch.float32 for v in weights.values())
    cfg_json = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg_json["architecture"] == saelens_arch and cfg_json["sae_pipeline_architecture"] == arch
    assert cfg_json["d_in"] == 6 and cfg_json["d_sae"] == 18
    if arch == "jumprelu":  # the file holds threshold = exp(log_threshold + shift); the loader reads it back
        assert torch.allclose(weights["threshold"], (sae.log_threshold.detach() + 0.3).exp())
        assert cfg_json["jumprelu_bandwidth"] == 0.05 and loaded.bandwidth == 0.05
        assert loaded.target_l0 == pytest.approx(0.1 * 18)
    if arch == "batchtopk":
        assert torch.equal(weights["threshold"], torch.full((18,), 0.15)) and cfg_json["k"] == 3


# ---------------------------------------------------------------- config

@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"architecture": "batchtopk"}, "k"),
        ({"architecture": "batchtopk", "k": 4, "l1_alpha": 0.1}, "l1_alpha"),
        ({"architecture": "jumprelu"}, "l0_coeff"),
        ({"architecture": "jumprelu", "l0_coeff": 0.1, "k": 4}, "k"),
        ({"architecture": "jumprelu", "l0_coeff": 0.1, "l1_alpha": 0.1}, "l1_alpha"),
        ({"architecture": "jumprelu", "l0_coeff": -1.0}, "l0_coeff"),
        ({"architecture": "jumprelu", "l0_coeff": 1.0, "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"architecture": "gated"}, "l1_alpha"),
        ({"architecture": "gated", "l1_alpha": 0.1, "k": 3}, "k"),
        ({"architecture": "relu", "l1_alpha": 0.1, "l0_coeff": 0.1}, "l0_coeff"),
        ({"architecture": "topk", "k": 3, "batchtopk_threshold_decay": 1.0}, "batchtopk_threshold_decay"),
    ],
)
def test_config_rejects(raw, field):
    with pytest.raises(ConfigError, match=field):
        parse_sae_config(raw)


def test_partition_keys():
    assert SAEConfig(architecture="batchtopk", k=64, expansion_factor=32).partition_key() == \
        "batchtopk_exp32_k64_lr4e-03_aux3e-02"
    assert SAEConfig(architecture="jumprelu", l0_coeff=1e-3, expansion_factor=8).partition_key() == \
        "jumprelu_exp8_l0c1e-03_lr3e-04"
    assert SAEConfig(architecture="gated", l1_alpha=5.0, expansion_factor=8).partition_key() == \
        "gated_exp8_l1a5e+00_lr3e-04"
    a = SAEConfig(architecture="jumprelu", l0_coeff=1e-3, jumprelu_bandwidth=0.5).partition_key()
    assert a != SAEConfig(architecture="jumprelu", l0_coeff=1e-3).partition_key()
    assert SAEConfig(architecture="jumprelu", l0_coeff=1.4e-3).partition_key() != \
        SAEConfig(architecture="jumprelu", l0_coeff=1e-3).partition_key()

"""Held-out metrics: streamed chunk by chunk, they must equal one float64 numpy pass over the eval matrix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from sae_pipeline.evaluation import DENSE_THRESHOLD, FREQUENT_THRESHOLD, decoder_max_cosines, evaluate_sae
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.saes.topk import TopKSAE
from sae_pipeline_tests.synthetic import write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, D_SAE, N_EVAL = 6, 40, 157


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(64, D_IN, generator=generator)
    eval_ = torch.randn(N_EVAL, D_IN, generator=generator) * 2 + torch.linspace(-1, 1, D_IN)
    eval_[10] = 0.0  # a zero token: finite metrics, no division by zero
    store = write_store(tmp_path_factory.mktemp("eval"), train, eval_, shard_tokens=50)  # 50, 50, 50, 7
    assert [s["n_tokens"] for s in store.shards("eval")] == [50, 50, 50, 7]
    return store


def _eval_matrix(store) -> np.ndarray:
    return np.concatenate([store.read("eval", i).numpy() for i in range(len(store.shards("eval")))]
                          ).astype(np.float64)


def _make_sae(arch: str, normalize: str = "none"):
    generator = torch.Generator().manual_seed(1)
    sae = ReluSAE(D_IN, D_SAE, normalize) if arch == "relu" else TopKSAE(D_IN, D_SAE, normalize, k=4)
    sae.initialize(generator, b_dec=0.1 * torch.randn(D_IN, generator=generator))
    with torch.no_grad():
        sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=generator))
        b_enc = 0.2 * torch.randn(D_SAE, generator=generator)
        b_enc[:5] = -1e3  # never fire: dead
        if arch == "relu":
            b_enc[5:8] = 1e3  # always fire: dense
        sae.b_enc.copy_(b_enc)
        sae.W_dec[9].copy_(2.0 * sae.W_dec[12] + 0.05 * sae.W_dec[13])  # a near-duplicate pair of rows
    return sae


def _shrinkage_by_minimisation(x_hat: np.ndarray, x: np.ndarray) -> float:
    """The gamma minimising sum ||x_hat / gamma - x||^2, found numerically (not from the closed form)."""
    found = minimize_scalar(lambda log_gamma: ((x_hat * np.exp(-log_gamma) - x) ** 2).sum(), bounds=(-20, 20),
                            method="bounded", options={"xatol": 1e-12})
    return float(np.exp(found.x))


def _max_cosines_by_loop(w_dec: np.ndarray) -> list[float]:
    """Each row's largest cosine with any other row, pair by pair."""
    best = [-np.inf] * len(w_dec)
    for i, j in itertools.permutations(range(len(w_dec)), 2):
        cosine = w_dec[i] @ w_dec[j] / (np.linalg.norm(w_dec[i]) * np.linalg.norm(w_dec[j]))
        best[i] = max(best[i], cosine)
    return best


def _reference(sae, x: np.ndarray) -> dict[str, float]:
    """All metrics from the whole eval matrix at once, in float64 numpy, from the raw parameters."""
    w_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    w_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    d = x.shape[1]
    if sae.normalize == "per_token":
        factor = np.sqrt(d) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    else:
        factor = np.ones((len(x), 1))
    pre = (x * factor - b_dec) @ w_enc + b_enc
    relu = np.maximum(pre, 0.0)
    if sae.architecture == "topk":
        latents = np.zeros_like(relu)
        top = np.argsort(-relu, axis=1)[:, : sae.k]
        np.put_along_axis(latents, top, np.take_along_axis(relu, top, axis=1), axis=1)
    else:
        latents = relu
    x_hat = (latents @ w_dec + b_dec) / factor
    active = latents > 0
    frequency = active.mean(axis=0)
    sse = ((x_hat - x) ** 2).sum()
    fvu = sse / ((x - x.mean(axis=0)) ** 2).sum()
    x_norm, x_hat_norm = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    cosine = (x * x_hat).sum(axis=1) / np.maximum(x_norm * x_hat_norm, 1e-12)
    l0 = active.sum(axis=1).mean()
    max_cosines = _max_cosines_by_loop(w_dec)
    return {
        "l0": l0,
        "l0_fraction": l0 / latents.shape[1],
        "dead_fraction": (frequency == 0).mean(),
        "dense_fraction": (frequency > DENSE_THRESHOLD).mean(),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "mse": sse / x.size,
        "cosine": cosine.mean(),
        "l2_ratio": (x_hat_norm / np.maximum(x_norm, 1e-12)).mean(),
        "frequent_fraction": (frequency > FREQUENT_THRESHOLD).mean(),
        "relative_reconstruction_bias": _shrinkage_by_minimisation(x_hat, x),
        "decoder_max_cosine_mean": np.mean(max_cosines),
        "decoder_max_cosine_max": np.max(max_cosines),
        "fire_counts": active.sum(axis=0),
    }


@pytest.mark.parametrize(("arch", "normalize"), [("topk", "none"), ("relu", "none"), ("relu", "per_token"),
                                                 ("topk", "per_token")])
@pytest.mark.parametrize("chunk", [7, 23, 50, 4096])
def test_metrics_equal_numpy_recomputation(store, arch, normalize, chunk):
    sae = _make_sae(arch, normalize)
    metrics, fire_counts = evaluate_sae(sae, store, chunk=chunk)
    expected = _reference(sae, _eval_matrix(store))
    assert metrics.n_tokens == N_EVAL
    got = metrics.as_dict()
    for name in ("l0", "l0_fraction", "dead_fraction", "dense_fraction", "frequent_fraction"):
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
    for name in ("fvu", "explained_variance", "mse", "cosine", "l2_ratio", "relative_reconstruction_bias",
                 "decoder_max_cosine_mean", "decoder_max_cosine_max"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert np.array_equal(fire_counts.numpy(), expected["fire_counts"])
    # the test data exercises every metric away from its trivial value
    assert 0 < got["dead_fraction"] < 1 and got["fvu"] > 0
    assert 0 < got["frequent_fraction"] >= got["dense_fraction"] and got["relative_reconstruction_bias"] != 1
    assert got["decoder_max_cosine_mean"] < got["decoder_max_cosine_max"] > 0.99  # rows 9 and 12
    if arch == "relu":
        assert got["dense_fraction"] > 0
    if arch == "topk":
        assert got["l0"] <= 4


def test_metrics_do_not_depend_on_chunk(store):
    sae = _make_sae("topk")
    results = [evaluate_sae(sae, store, chunk=c)[0].as_dict() for c in (1, 13, 157)]
    for other in results[1:]:
        for name, value in results[0].items():
            assert other[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_perfect_reconstruction_metrics(tmp_path):
    """An SAE that reconstructs exactly: fvu 0, explained variance 1, cosine 1, l2 ratio 1, mse 0."""
    d = 3
    eval_ = torch.randn(20, d, generator=torch.Generator().manual_seed(2))
    store = write_store(tmp_path, torch.randn(10, d), eval_, shard_tokens=8)
    sae = ReluSAE(d, 2 * d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # z = [relu(x), relu(-x)]
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # x_hat = relu(x) - relu(-x) = x
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    metrics, counts = evaluate_sae(sae, store, chunk=6)
    assert metrics.fvu == pytest.approx(0.0, abs=1e-10)
    assert metrics.explained_variance == pytest.approx(1.0, abs=1e-10)
    assert metrics.mse == pytest.approx(0.0, abs=1e-12)
    assert metrics.cosine == pytest.approx(1.0, abs=1e-6)
    assert metrics.l2_ratio == pytest.approx(1.0, abs=1e-6)
    assert metrics.l0 == pytest.approx(3.0)  # one of each +/- pair fires (no exact zeros in randn)
    assert counts.sum().item() == 60
    assert metrics.relative_reconstruction_bias == pytest.approx(1.0, abs=1e-9)
    # rows +e_i, -e_i: another row is orthogonal (cosine 0) or opposite (-1), so each row's max is 0
    assert metrics.decoder_max_cosine_mean == pytest.approx(0.0, abs=1e-12)
    assert metrics.decoder_max_cosine_max == pytest.approx(0.0, abs=1e-12)

    with torch.no_grad():
        sae.W_dec.mul_(0.6)  # x_hat = 0.6 x: shrunk by 0.6, and the relative reconstruction bias says so
    shrunk, _ = evaluate_sae(sae, store, chunk=6)
    assert shrunk.relative_reconstruction_bias == pytest.approx(0.6, rel=1e-6)
    assert shrunk.fvu > 0 and shrunk.cosine == pytest.approx(1.0, abs=1e-6)


def test_explained_variance_is_against_the_mean_not_zero(tmp_path):
    """An SAE that outputs the held-out mean for every token explains nothing (fvu 1, explained variance 0), even
    though the activations sit far from zero; against zero it would score about 0.99."""
    generator = torch.Generator().manual_seed(3)
    eval_ = torch.randn(40, 4, generator=generator) + torch.tensor([10.0, -8.0, 6.0, 12.0])
    store = write_store(tmp_path, torch.randn(10, 4), eval_, shard_tokens=16)
    sae = ReluSAE(4, 8)
    with torch.no_grad():
        sae.W_enc.normal_(generator=generator)
        sae.W_dec.zero_()
        sae.b_dec.copy_(eval_.double().mean(dim=0).float())
    metrics, _ = evaluate_sae(sae, store, chunk=16)
    x = eval_.double().numpy()
    against_zero = 1 - ((x - x.mean(axis=0)) ** 2).sum() / (x ** 2).sum()
    assert against_zero > 0.98
    assert metrics.fvu == pytest.approx(1.0, abs=1e-5)
    assert metrics.explained_variance == pytest.approx(0.0, abs=1e-5)


def test_decoder_max_cosines_in_chunks_equal_one_pass():
    w_dec = torch.randn(37, 5, generator=torch.Generator().manual_seed(4))
    expected = _max_cosines_by_loop(w_dec.double().numpy())
    for chunk in (1, 8, 37, 100):
        assert decoder_max_cosines(w_dec, chunk=chunk).tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)

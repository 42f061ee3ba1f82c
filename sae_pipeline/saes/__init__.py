"""SAE architectures behind one interface; adding one is adding a module and a registry entry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder, load_state, read_cfg
from sae_pipeline.saes.batchtopk import BatchTopKSAE
from sae_pipeline.saes.gated import GatedSAE
from sae_pipeline.saes.jumprelu import JumpReLUSAE
from sae_pipeline.saes.matryoshka import MatryoshkaSAE
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.saes.topk import TopKSAE

if TYPE_CHECKING:  # the architectures import with torch alone (sae_pipeline.bench on a GPU machine)
    from sae_pipeline.config import SAEConfig

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {"relu": ReluSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE,
                                                     "jumprelu": JumpReLUSAE, "gated": GatedSAE,
                                                     "matryoshka": MatryoshkaSAE}


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """A fresh (uninitialised) SAE for a config and model width."""
    cfg.validate_for_model(d_in)
    normalize = "per_token" if cfg.normalize == "per_token" else "none"
    if cfg.architecture == "topk":
        return TopKSAE(d_in, cfg.d_sae(d_in), normalize, k=cfg.k, k_aux=cfg.k_aux, aux_coeff=cfg.aux_coeff,
                       kernel=cfg.kernel)
    if cfg.architecture == "batchtopk":
        return BatchTopKSAE(d_in, cfg.d_sae(d_in), normalize, k=cfg.k, k_aux=cfg.k_aux, aux_coeff=cfg.aux_coeff,
                            threshold_decay=cfg.batchtopk_threshold_decay, kernel=cfg.kernel)
    if cfg.architecture == "matryoshka":
        return MatryoshkaSAE(d_in, cfg.d_sae(d_in), normalize, k=cfg.k, k_aux=cfg.k_aux, aux_coeff=cfg.aux_coeff,
                             threshold_decay=cfg.batchtopk_threshold_decay, kernel=cfg.kernel,
                             widths=cfg.matryoshka_widths(d_in))
    if cfg.architecture == "jumprelu":
        target = None if cfg.target_l0 is None else cfg.target_l0 * cfg.d_sae(d_in)
        return JumpReLUSAE(d_in, cfg.d_sae(d_in), normalize, bandwidth=cfg.jumprelu_bandwidth,
                           init_threshold=cfg.jumprelu_init_threshold, target_l0=target)
    if cfg.architecture == "gated":
        return GatedSAE(d_in, cfg.d_sae(d_in), normalize)
    return ReluSAE(d_in, cfg.d_sae(d_in), normalize, weight_l1_by_decoder_norm=cfg.l1_weighted_by_decoder_norm)


def load_sae(folder: str | Path) -> SparseAutoencoder:
    """Rebuild an SAE from cfg.json + sae_weights.safetensors alone."""
    cfg = read_cfg(Path(folder))
    cls = ARCHITECTURES[cfg["sae_pipeline_architecture"]]
    sae = cls(cfg["d_in"], cfg["d_sae"], "per_token" if cfg["normalize_activations"] == "constant_norm_rescale"
              else "none", k=cfg.get("k"), **cls.cfg_kwargs(cfg))
    return load_state(sae, Path(folder)).eval()


__all__ = ["ARCHITECTURES", "ForwardOutput", "SparseAutoencoder", "build_sae", "load_sae"]

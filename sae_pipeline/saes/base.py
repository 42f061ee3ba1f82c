"""The interface every SAE architecture implements, the SAELens file layout, and input normalisation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae_pipeline.kernels import SparseCode

if TYPE_CHECKING:  # the architectures import with torch alone (sae_pipeline.bench on a GPU machine)
    from sae_pipeline.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
NORM_EPS = 1e-6


class ForwardOutput(NamedTuple):
    """What one training forward pass returns."""

    x_hat: Tensor
    """Reconstruction of the (normalised) input, [batch, d_in]."""
    latents: Tensor | None
    """Latent activations, [batch, d_sae]; zero where a latent does not fire. None on the sparse path (`code`)."""
    loss: Tensor
    """Total training loss: reconstruction + sparsity + auxiliary."""
    recon_loss: Tensor
    """Squared error summed over d_in, averaged over the batch."""
    sparsity_loss: Tensor
    """Coefficient-weighted sparsity penalty (zero for TopK, whose sparsity is structural)."""
    aux_loss: Tensor
    """Coefficient-weighted auxiliary loss (AuxK for TopK; zero otherwise)."""
    code: SparseCode | None = None
    """The selected latents in CSR form, on the sparse path instead of `latents`."""

    def fired(self) -> Tensor:
        """[d_sae] bool: latents positive on at least one token of the batch."""
        return self.code.fired() if self.code is not None else (self.latents > 0).any(dim=0)

    def l0(self) -> Tensor:
        """Mean number of positive latents per token."""
        return self.code.l0() if self.code is not None else (self.latents > 0).sum(dim=-1).float().mean()

    def dense_latents(self) -> Tensor:
        """`latents`, built from `code` on the sparse path (for tests and inspection, not the training step)."""
        return self.code.to_dense() if self.code is not None else self.latents


def normalize_per_token(x: Tensor, eps: float = NORM_EPS) -> tuple[Tensor, Tensor]:
    """Rescale each row to norm sqrt(d); returns (scaled, the factor applied per row).

    The norm is clamped at `eps`, so a zero vector stays a finite zero vector instead of dividing by zero
    (seed 003's bug). A NaN or Inf cannot be rescaled into anything meaningful, so it is an error, not a
    silently propagated NaN: the message says how many rows are non-finite.
    """
    finite = torch.isfinite(x).all(dim=-1)
    if not bool(finite.all()):
        raise ValueError(f"normalize_per_token: {int((~finite).sum())} row(s) contain NaN or Inf; "
                         "activations must be finite (the `activations` checks flag such shards)")
    factor = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp(min=eps)
    return x * factor, factor


def l1_penalty(latents: Tensor, decoder_norms: Tensor | None = None) -> Tensor:
    """L1 summed over latents, then averaged over the batch (never averaged over latents: seed 003's bug)."""
    weighted = latents.abs() if decoder_norms is None else latents.abs() * decoder_norms
    return weighted.sum(dim=-1).mean()


def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """The point minimising the summed Euclidean distance to the rows of `points` [n, d] (Weiszfeld's algorithm).

    Starts at the mean; each iteration is the mean weighted by 1 / distance, distances clamped at `eps` so a
    point that coincides with the estimate does not divide by zero. Stops after `max_iter` iterations or once the
    estimate moves by less than `tol` times the median distance of the points to it. Computed in float64 on the
    points' device; returned in their dtype. Unlike the mean, it is not pulled far by a few outsized tokens.
    """
    x = points.double()
    median = x.mean(dim=0)
    for _ in range(max_iter):
        distances = (x - median).norm(dim=1).clamp(min=eps)
        weights = 1.0 / distances
        updated = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * distances.median():
            break
    return median.to(points.dtype)


class SparseAutoencoder(nn.Module):
    """x -> z = f((x - b_dec) W_enc + b_enc) -> x_hat = z W_dec + b_dec, with f set by the architecture."""

    architecture: ClassVar[str]
    """The name configs use (`architecture: topk`) and cfg.json records."""
    saelens_architecture: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    sparsity_field: ClassVar[str]
    """The SAEConfig field that sets this architecture's sparsity (required; the other architectures' are refused)."""
    key_fields: ClassVar[tuple[str, ...]]
    """SAEConfig fields spelled out in the partition key after `<architecture>_exp<expansion_factor>`, in order."""
    config_defaults: ClassVar[dict[str, Any]] = {"lr": 3e-4, "lr_warmup_steps": 50, "idle_latents_still": False}
    """Defaults of the SAEConfig fields whose default depends on the architecture (a subclass may set some of them;
    the rest come from its parents)."""
    exclusive_fields: ClassVar[tuple[str, ...]] = ()
    """SAEConfig fields only this architecture (and its subclasses) may set away from their default."""
    sparse_kernel: ClassVar[bool] = False
    """Whether `kernel: sparse` exists for this architecture (the TopK family's sparse training step)."""
    l1_steered: ClassVar[bool] = False
    """L0 is set by the l1_alpha penalty alone: the calibration loop tunes l1_alpha toward `target_l0`, and the
    L0-trend check expects L0 to fall during training."""

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none"):
        super().__init__()
        self.d_in, self.d_sae, self.normalize = d_in, d_sae, normalize
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, b_dec: Tensor | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transposed, b_dec from a data sample."""
        self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator))
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        if b_dec is None:
            self.b_dec.zero_()
        else:
            self.b_dec.copy_(b_dec)

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations of (normalised) inputs."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat, latents) for raw activations, applying and undoing per-token normalisation if configured."""
        if self.normalize == "per_token":
            scaled, factor = normalize_per_token(x)
            latents = self.encode(scaled)
            return self.decode(latents) / factor, latents
        latents = self.encode(x)
        return self.decode(latents), latents

    def inputs(self, x: Tensor) -> Tensor:
        """What the encoder reads for raw activations: per-token normalised if configured, else x itself."""
        return normalize_per_token(x)[0] if self.normalize == "per_token" else x

    def latents(self, x: Tensor) -> Tensor:
        """The latents `reconstruct` gives for raw activations, without decoding (what features read)."""
        return self.encode(self.inputs(x))

    @staticmethod
    def recon_loss(x_hat: Tensor, x: Tensor) -> Tensor:
        return (x_hat - x).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=NORM_EPS))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so the renorm does not fight Adam."""
        if self.W_dec.grad is None:
            return
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec).unsqueeze(1)
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1.0)

    @torch.no_grad()
    def fold_scaling_factor(self, factor: float) -> None:
        """Make an SAE trained on `factor * x` take raw x: scale W_enc up, W_dec and b_dec down.

        The pre-activations, and so the latents, are unchanged: thresholds on them (JumpReLU, BatchTopK) stay."""
        self.W_enc.mul_(factor)
        self.W_dec.div_(factor)
        self.b_dec.div_(factor)

    def after_step(self, out: ForwardOutput) -> None:
        """Called by the trainer after each optimizer step with that step's output (BatchTopK's running threshold)."""

    def extra_cfg(self) -> dict[str, Any]:
        return {}

    @classmethod
    def cfg_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Constructor keyword arguments (beyond d_in, d_sae, normalize) read back from cfg.json."""
        return {}

    @classmethod
    def config_kwargs(cls, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
        """Constructor keyword arguments (beyond d_in, d_sae, normalize) taken from a training config."""
        return {}

    @classmethod
    def from_config(cls, cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
        """A fresh (uninitialised) SAE of this architecture for a config and model width."""
        normalize = "per_token" if cfg.normalize == "per_token" else "none"
        return cls(d_in, cfg.d_sae(d_in), normalize, **cls.config_kwargs(cfg, d_in))

    @classmethod
    def default(cls, field: str) -> Any:
        """The architecture's default of a `config_defaults` field: the nearest class in the MRO that sets it."""
        for klass in cls.__mro__:
            table = vars(klass).get("config_defaults", {})
            if field in table:
                return table[field]
        raise KeyError(f"{field}: no architecture default")

    @classmethod
    def penalty_coefficient(cls, cfg: SAEConfig) -> float | None:
        """The coefficient the trainer passes to `forward` (ramped over l1_warmup_steps); None: no penalty."""
        return getattr(cfg, cls.sparsity_field)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Architecture-specific rules on a config beyond the generic ones; raise ValueError naming the field."""

    @classmethod
    def check_for_model(cls, cfg: SAEConfig, d_model: int) -> None:
        """Architecture-specific rules that need the model's width; raise ConfigError naming the field."""

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors written to sae_weights.safetensors (the state dict unless the file layout differs)."""
        return {name: p.detach().cpu().contiguous() for name, p in self.state_dict().items()}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `file_tensors`; shapes and names are checked by load_state_dict(strict=True)."""
        self.load_state_dict(tensors, strict=True)

    def saelens_cfg(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """cfg.json: everything needed to run the SAE from cfg.json + sae_weights.safetensors alone."""
        return {
            "architecture": self.saelens_architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "constant_norm_rescale" if self.normalize == "per_token" else "none",
            "sae_pipeline_architecture": self.architecture,
            **self.extra_cfg(),
            # SAELens keeps these top-level keys as `cfg.metadata` (it drops our `metadata` for want of a
            # sae_lens_version): the model's name is the one it uses
            **({"model_name": metadata["model"]} if "model" in metadata else {}),
            **({"hook_name": metadata["hook_name"]} if "hook_name" in metadata else {}),
            "metadata": metadata,
        }

    def save(self, folder: Path, metadata: dict[str, Any]) -> None:
        """Write cfg.json and sae_weights.safetensors (SAELens layout) into an existing folder."""
        from safetensors.torch import save_file  # imported here: training and the bench need torch alone

        save_file(self.file_tensors(), str(folder / WEIGHTS_FILE))
        (folder / CFG_FILE).write_text(json.dumps(self.saelens_cfg(metadata), indent=2, default=str))


def read_cfg(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CFG_FILE).read_text())


def load_state(sae: SparseAutoencoder, folder: Path) -> SparseAutoencoder:
    """Load weights with safetensors (no pickle); shapes are checked by load_state_dict(strict=True)."""
    from safetensors.torch import load_file

    sae.load_file_tensors(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return sae

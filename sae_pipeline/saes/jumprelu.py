"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): learnt per-latent thresholds and an L0 penalty.

z = pre * H(pre - theta) with theta = exp(log_threshold). The step H has no useful derivative, so the threshold
gets a straight-through estimate through a rectangle kernel of width `bandwidth` (eps):
    d JumpReLU / d theta = -(theta / eps) * rect((pre - theta) / eps)
    d H(pre - theta) / d theta = -(1 / eps) * rect((pre - theta) / eps)
and no gradient reaches `pre` through the step (JumpReLU passes H(pre - theta) to `pre`). The sparsity loss is
coeff * mean L0 (L0 = sum over latents of H, per token), or coeff * (L0 / target - 1)^2 toward a target L0.
The file layout is SAELens' JumpReLU: `threshold` [d_sae] (not its log) next to W_enc, b_enc, W_dec, b_dec.

Training to a target. Adam normalises every parameter's step to about lr, whatever the loss coefficient, so a
penalty on L0 alone moves log theta by at most lr * steps (0.23 for 780 steps at 3e-4): from the init of 1e-3 the
thresholds never reach the scale of the pre-activations (about 1 on normalised inputs), and held-out L0 stayed
near a third of d_sae whatever l0_coeff was (SAELens #494/#719 are the same family). With a target set, a shared
shift s of the log thresholds, theta_i = exp(log_threshold_i + s), is therefore set from the measured L0 outside
the optimiser, after every step:
- the first step calibrates it, as BatchTopK picks its cut: s grows by the (n + 1)-th largest log(z / theta) of
  the batch's code, n = round(target * batch), so that exactly n of the batch's activations would have passed
  (when the batch fired fewer than n, the controller below moves it instead); training then starts at the target
  rather than spending its first ~50 steps with half the latents on;
- every later step is an integral controller: s <- s + TARGET_GAIN * log((L0_batch + 1) / (target + 1)).
This moves all thresholds together by however much the level needs, while Adam still learns the per-latent
thresholds (which latents fire) from the reconstruction and L0 gradients. The gain is dimensionless: near the
target the log-L0 of a Gaussian-tailed pre-activation falls by about theta^2 (~5 at 1 % firing) per unit of
log-threshold, so 0.05 closes ~25 % of the remaining log error per step, and batch-to-batch noise in L0 barely
moves it. s is a buffer: it is checkpointed with the weights, and the saved `threshold` is exp(log_threshold + s).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder

if TYPE_CHECKING:
    from sae_pipeline.config import SAEConfig

TARGET_GAIN = 0.05
"""Step of the threshold controller in log-threshold per unit of log-L0 error (see the module docstring)."""


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient [..., d_sae] back to the threshold's shape [d_sae]."""
    return grad.reshape(-1, like.shape[-1]).sum(dim=0).reshape(like.shape)


class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - threshold); straight-through threshold gradient via the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad
        return grad_pre, _reduce_to(grad_threshold, threshold), None


class StepFunction(torch.autograd.Function):
    """H(pre - threshold); straight-through threshold gradient via the rectangle kernel, none to `pre`."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), _reduce_to(grad_threshold, threshold), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return JumpReLUFunction.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return StepFunction.apply(pre, threshold, bandwidth)


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    sparsity_field = "l0_coeff"
    key_fields = ("l0_coeff", "lr")

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none", bandwidth: float = 1e-3,
                 init_threshold: float = 1e-3, target_l0: float | None = None):
        super().__init__(d_in, d_sae, normalize)
        if bandwidth <= 0 or init_threshold <= 0:
            raise ValueError(f"bandwidth {bandwidth} and init_threshold {init_threshold} must be > 0")
        self.bandwidth = bandwidth
        self.init_threshold = init_threshold
        self.target_l0 = target_l0
        """Target L0 as a number of latents per token (None: plain L0 penalty)."""
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))
        self.register_buffer("log_threshold_shift", torch.zeros(()))
        """The controller's shared shift s of the log thresholds (stays 0 without a target)."""
        self._calibrated: bool | None = None
        """Whether the first step's calibration is done; None until read back from the shift (s != 0), the one
        host read of a run, so that a resumed run is not calibrated again."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A checkpoint written before the target controller has no shift: it resumes with s = 0, and so is
        calibrated on its next step, like a fresh run."""
        state_dict.setdefault(prefix + "log_threshold_shift", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, b_dec: Tensor | None = None) -> None:
        super().initialize(generator, b_dec)
        self.log_threshold.fill_(math.log(self.init_threshold))
        self.log_threshold_shift.zero_()
        self._calibrated = None

    @property
    def threshold(self) -> Tensor:
        return (self.log_threshold + self.log_threshold_shift).exp()

    def controller_step(self, l0: Tensor) -> Tensor:
        """TARGET_GAIN * log((L0 + 1) / (target + 1)): the integral controller's change of s."""
        return TARGET_GAIN * torch.log((l0.detach().float() + 1) / (self.target_l0 + 1))

    def calibration_step(self, latents: Tensor) -> Tensor:
        """The change of s after which round(target * batch) of this code's activations pass their thresholds:
        the next largest log(z / theta); the controller's step when the code has no more than that many."""
        n = round(self.target_l0 * latents.shape[0])
        ratios = torch.log(latents.detach().float() / self.threshold.detach()).masked_fill(latents <= 0, -math.inf)
        cut = ratios.flatten().topk(min(n + 1, ratios.numel())).values[-1]
        return torch.where(torch.isfinite(cut), cut, self.controller_step((latents > 0).sum(dim=-1).float().mean()))

    @torch.no_grad()
    def steer_to_target(self, out: ForwardOutput) -> None:
        """Move s after a step: calibration on the first step, the integral controller on the others."""
        if self._calibrated is None:
            self._calibrated = bool(self.log_threshold_shift != 0)
        step = self.controller_step(out.l0()) if self._calibrated else self.calibration_step(out.latents)
        self.log_threshold_shift.add_(step)
        self._calibrated = True

    def after_step(self, out: ForwardOutput) -> None:
        if self.target_l0 is not None:
            self.steer_to_target(out)

    def encode(self, x: Tensor) -> Tensor:
        return jumprelu(self.pre_activations(x), self.threshold, self.bandwidth)

    def l0_loss(self, l0: Tensor, sparsity_coeff: float | Tensor) -> Tensor:
        """coeff * L0, or coeff * (L0 / target - 1)^2 when a target is set."""
        if self.target_l0 is None:
            return sparsity_coeff * l0
        return sparsity_coeff * (l0 / self.target_l0 - 1).pow(2)

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        pre = self.pre_activations(x)
        threshold = self.threshold
        latents = jumprelu(pre, threshold, self.bandwidth)
        x_hat = self.decode(latents)
        recon = self.recon_loss(x_hat, x)
        l0 = step(pre, threshold, self.bandwidth).sum(dim=-1).mean()
        sparsity = self.l0_loss(l0, sparsity_coeff)
        return ForwardOutput(x_hat, latents, recon + sparsity, recon, sparsity, recon.new_zeros(()))

    def extra_cfg(self) -> dict[str, Any]:
        return {"activation_fn": "relu", "jumprelu_bandwidth": self.bandwidth,
                "jumprelu_init_threshold": self.init_threshold, "jumprelu_target_l0": self.target_l0}

    @classmethod
    def config_kwargs(cls, cfg: SAEConfig, d_in: int) -> dict[str, Any]:
        """target_l0, a fraction of d_sae in the config, is a number of latents per token here."""
        target = None if cfg.target_l0 is None else cfg.target_l0 * cfg.d_sae(d_in)
        return {"bandwidth": cfg.jumprelu_bandwidth, "init_threshold": cfg.jumprelu_init_threshold,
                "target_l0": target}

    @classmethod
    def cfg_kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"bandwidth": cfg.get("jumprelu_bandwidth", 1e-3),
                "init_threshold": cfg.get("jumprelu_init_threshold", 1e-3),
                "target_l0": cfg.get("jumprelu_target_l0")}

    def file_tensors(self) -> dict[str, Tensor]:
        """SAELens layout: `threshold` = exp(log_threshold + s) in place of the trained log and shift."""
        tensors = super().file_tensors()
        tensors["threshold"] = (tensors.pop("log_threshold") + tensors.pop("log_threshold_shift")).exp().contiguous()
        return tensors

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        if "threshold" in tensors:
            tensors["log_threshold"] = tensors.pop("threshold").log()
            tensors["log_threshold_shift"] = torch.zeros(())
        super().load_file_tensors(tensors)

"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

One encoder matrix W_enc serves two paths on x' = x - b_dec:
    gate       pi_gate = x' W_enc + b_gate                       -> which latents fire: 1[pi_gate > 0]
    magnitude  pi_mag  = x' (W_enc * exp(r_mag)) + b_mag         -> how strongly: relu(pi_mag)
    z = 1[pi_gate > 0] * relu(pi_mag),  x_hat = z W_dec + b_dec
The step has no gradient, so the gate learns from the sparsity and auxiliary losses only:
    sparsity = coeff * mean over batch of sum_i relu(pi_gate)_i * ||W_dec row i||
    aux      = || x - (relu(pi_gate) W_dec.detach() + b_dec.detach()) ||^2 (summed over d_in, batch mean)
The file layout is SAELens' gated: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec (no b_enc).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_pipeline.saes.base import ForwardOutput, SparseAutoencoder, l1_penalty


class GatedSAE(SparseAutoencoder):
    architecture = "gated"
    saelens_architecture = "gated"
    sparsity_field = "l1_alpha"
    key_fields = ("l1_alpha", "lr")

    def __init__(self, d_in: int, d_sae: int, normalize: str = "none"):
        super().__init__(d_in, d_sae, normalize)
        del self.b_enc  # the two paths have their own biases
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, b_dec: Tensor | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transposed, zero biases and r_mag."""
        self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator))
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        for p in (self.b_gate, self.r_mag, self.b_mag):
            p.zero_()
        if b_dec is None:
            self.b_dec.zero_()
        else:
            self.b_dec.copy_(b_dec)

    def pre_activations(self, x: Tensor) -> Tensor:
        """The gate pre-activations pi_gate."""
        return (x - self.b_dec) @ self.W_enc + self.b_gate

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        centred = x - self.b_dec
        projected = centred @ self.W_enc
        return projected + self.b_gate, projected * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def forward(self, x: Tensor, sparsity_coeff: float | Tensor = 0.0, dead_mask: Tensor | None = None
                ) -> ForwardOutput:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        latents = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        x_hat = self.decode(latents)
        recon = self.recon_loss(x_hat, x)
        gate_acts = torch.relu(pi_gate)
        sparsity = sparsity_coeff * l1_penalty(gate_acts, self.W_dec.norm(dim=1))
        x_hat_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = self.recon_loss(x_hat_gate, x)
        return ForwardOutput(x_hat, latents, recon + sparsity + aux, recon, sparsity, aux)

    def extra_cfg(self) -> dict:
        return {"activation_fn": "relu"}

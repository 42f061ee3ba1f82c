"""The training loop: one SAE, one config, read top to bottom.

Schedules (lr warmup + linear decay, sparsity-coefficient warmup), dead-latent tracking (AuxK for TopK),
decoder-norm constraint, a metrics row every `log_every` steps (the only host synchronisation: one read per row),
and atomic checkpoints that a killed run resumes from exactly. One optimiser step is `training_step`, which
`sae_pipeline.bench` times as it is (`sae_pipeline/step.py`; its cost in matmuls is in `sae_pipeline/kernels.py`).

AuxK is skipped, not multiplied by zero, while no latent can be dead: a latent is dead after `dead_tokens`
tokens without firing, so from the largest tokens-since-fired read at the last log row the loop knows on the
host the first step at which any latent could be dead, and passes no dead mask before it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from sae_pipeline.activations import ActivationStore, BatchSampler, Prefetcher
from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.resampling import resample_dead_latents
from sae_pipeline.saes import SparseAutoencoder, build_sae
from sae_pipeline.saes.base import normalize_per_token
from sae_pipeline.step import make_optimizer, training_step, update_firing

CHECKPOINT_FILE = "checkpoint.pt"
RESAMPLE_INPUTS = 8192
"""Inputs scored to choose replacement directions at each resampling."""
METRIC_COLUMNS = ["step", "tokens", "loss", "mse", "sparsity_loss", "aux_loss", "l0", "dead_fraction", "lr"]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint on disk belongs to another config; the message names the file."""


@dataclass
class TrainResult:
    """A trained SAE (on CPU, taking raw activations) and how it got there."""

    sae: SparseAutoencoder
    metrics: pl.DataFrame
    """One row per log interval: METRIC_COLUMNS, each averaged over the interval."""
    train_tokens: int
    wall_seconds: float
    resumed_from_step: int
    scaling_factor: float
    """Dataset-wide input factor folded into the saved weights (1.0 when not used)."""


def lr_lambda(cfg: SAEConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier on the base lr: linear warmup, constant, then linear or cosine decay to zero over the last
    fraction of steps."""
    decay_steps = int(total_steps * cfg.lr_decay_fraction)
    decay_start = total_steps - decay_steps

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
        if step < decay_start or decay_steps == 0:
            return warm
        remaining = max(0.0, (total_steps - step) / decay_steps)  # 1 at the start of the decay, 0 at the end
        return warm * (remaining if cfg.lr_decay == "linear" else 0.5 * (1 - math.cos(math.pi * remaining)))

    return factor


def sparsity_coefficient(cfg: SAEConfig, step: int) -> float:
    """l1_alpha (l0_coeff for JumpReLU) ramped linearly over `l1_warmup_steps` (0 for TopK/BatchTopK)."""
    alpha = cfg.l0_coeff if cfg.architecture == "jumprelu" else cfg.l1_alpha
    if alpha is None:
        return 0.0
    if cfg.l1_warmup_steps == 0:
        return alpha
    return alpha * min(1.0, (step + 1) / cfg.l1_warmup_steps)


def is_stable(rows: list[dict], window: int, tolerance: float) -> bool:
    """Early stop: over the last `window` log rows, L0 and loss each vary by less than `tolerance` (relative)."""
    if window < 2 or len(rows) < window:
        return False
    for column in ("l0", "loss"):
        values = [row[column] for row in rows[-window:]]
        mean = sum(values) / window
        if mean <= 0 or (max(values) - min(values)) / mean >= tolerance:
            return False
    return True


def resample_due(cfg: SAEConfig, done: int, total_steps: int) -> bool:
    """Resample every `resample_every` steps, but not in the final lr-decay phase (nothing left to learn)."""
    decay_start = total_steps - int(total_steps * cfg.lr_decay_fraction)
    return bool(cfg.resample_every) and done % cfg.resample_every == 0 and done < decay_start


def steps_until_dead_possible(tokens_since_fired: torch.Tensor, dead_window: int, batch_size: int) -> torch.Tensor:
    """Steps for which no latent can reach `dead_window` tokens without firing (each step adds at most one batch
    to every count); rounded down and capped at 2**24 so that it stays exact as a float32 in the log-row read."""
    return ((dead_window - tokens_since_fired.max()) // batch_size).clamp(0, 2**24)


def autocast_context(cfg: SAEConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where configured (`auto`: on CUDA only); fp32 otherwise."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device: {device!r} is not a device; allowed auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def input_transform(cfg: SAEConfig, store: ActivationStore) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """How raw activations are scaled for training, and the dataset factor to fold afterwards."""
    if cfg.normalize == "dataset":
        factor = float(store.meta["norm_stats"]["scaling_factor"])
        return (lambda x: x * factor), factor
    if cfg.normalize == "per_token":
        return (lambda x: normalize_per_token(x)[0]), 1.0
    return (lambda x: x), 1.0


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: SAEConfig) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated file is reported, never silently restarted over
        raise CheckpointMismatchError(f"{path}: unreadable checkpoint ({error}); delete it to start over") from None
    if state.get("config") != cfg.model_dump_json():
        raise CheckpointMismatchError(f"{path}: checkpoint belongs to another config; delete it to start over")
    return state


def train_sae(cfg: SAEConfig, store: ActivationStore, device: str = "auto", checkpoint_dir: Path | None = None,
              log: Callable[[dict], None] | None = None,
              on_checkpoint: Callable[[], None] | None = None) -> TrainResult:
    """Train one SAE on the store's train shards; resume from `checkpoint_dir` if it holds a checkpoint.

    `on_checkpoint` runs after each checkpoint is written (the asset commits it to object storage there).
    """
    started = time.perf_counter()
    cfg.validate_for_model(store.d_model)
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.manual_seed(cfg.seed)
    transform, factor = input_transform(cfg, store)
    total_steps = max(1, cfg.train_tokens // cfg.batch_size)
    dead_window = min(cfg.dead_tokens, total_steps * cfg.batch_size)

    sae = build_sae(cfg, store.d_model)
    sample = transform(store.sample(8192, seed=cfg.seed))
    sae.initialize(torch.Generator().manual_seed(cfg.seed), b_dec=sample.mean(dim=0))
    sae.to(dev)
    optimizer = make_optimizer(sae, cfg.lr, dev)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    sampler = BatchSampler(store, cfg.batch_size, cfg.seed)
    tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=dev)
    rows: list[dict] = []
    start_step = 0

    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    state = _load_checkpoint(checkpoint_path, cfg) if checkpoint_path else None
    if state is not None:
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        tokens_since_fired.copy_(state["tokens_since_fired"])
        torch.set_rng_state(state["rng"])
        rows, start_step = state["rows"], state["step"]

    window = torch.zeros(5, device=dev)  # loss, recon, sparsity, aux, l0 summed since the last log row
    window_steps = 0
    if state is not None and "window" in state:  # a checkpoint between two log rows carries the partial sums
        window.copy_(state["window"])
        window_steps = int(state["window_steps"])
    aux_from = start_step + int(steps_until_dead_possible(tokens_since_fired, dead_window, cfg.batch_size))
    forward = torch.compile(sae) if cfg.torch_compile else sae
    autocast = autocast_context(cfg, dev)
    sae.train()
    with Prefetcher(sampler) as loader:  # the next batches are read while this step computes
        for step in range(start_step, total_steps):
            x = transform(loader.next_batch()).to(dev, non_blocking=True)
            dead_mask = tokens_since_fired >= dead_window if step >= aux_from else None
            out = training_step(sae, forward, optimizer, x, sparsity_coefficient(cfg, step), dead_mask, cfg.grad_clip,
                                autocast)
            scheduler.step()

            with torch.no_grad():
                update_firing(tokens_since_fired, out, x.shape[0])
                terms = (out.loss, out.recon_loss, out.sparsity_loss, out.aux_loss, out.l0())
                window += torch.stack([t.float() for t in terms]).detach()  # float: bf16 autocast mixes dtypes
                window_steps += 1

            done = step + 1
            if resample_due(cfg, done, total_steps):
                dead = tokens_since_fired >= min(dead_window, cfg.resample_every * cfg.batch_size)
                sample = transform(store.sample(RESAMPLE_INPUTS, seed=cfg.seed + done)).to(dev)
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + done)
                if resample_dead_latents(sae, optimizer, dead, sample, generator):
                    tokens_since_fired.masked_fill_(dead, 0)
            if done % cfg.log_every == 0 or done == total_steps:
                seen = done * cfg.batch_size
                dead_share = (tokens_since_fired >= min(dead_window, seen)).float().mean()
                wait = steps_until_dead_possible(tokens_since_fired, dead_window, cfg.batch_size)
                # the row's one host read: interval means, dead share, and how long AuxK can still be skipped
                *means, dead_share, wait = torch.cat([window / window_steps, dead_share[None],
                                                      wait[None].float()]).tolist()
                aux_from = done + int(wait)
                row = {"step": done, "tokens": seen, "loss": means[0], "mse": means[1] / store.d_model,
                       "sparsity_loss": means[2], "aux_loss": means[3], "l0": means[4],
                       "dead_fraction": dead_share, "lr": scheduler.get_last_lr()[0]}
                rows.append(row)
                if log:
                    log(row)
                window.zero_()
                window_steps = 0
                if is_stable(rows, cfg.early_stop_window, cfg.early_stop_tolerance):
                    break
            if checkpoint_path and done % cfg.checkpoint_every == 0 and done < total_steps:
                _save_checkpoint(checkpoint_path, {
                    "config": cfg.model_dump_json(), "step": done, "sae": sae.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "sampler": loader.state_dict(), "tokens_since_fired": tokens_since_fired.cpu(),
                    "rng": torch.get_rng_state(), "rows": rows,
                    "window": window.cpu(), "window_steps": window_steps,
                })
                if on_checkpoint:
                    on_checkpoint()

    sae = sae.cpu().eval()
    if cfg.normalize == "dataset":
        sae.fold_scaling_factor(factor)
    metrics = pl.DataFrame(rows, schema={c: (pl.Int64 if c in ("step", "tokens") else pl.Float64)
                                         for c in METRIC_COLUMNS})
    return TrainResult(sae, metrics, rows[-1]["tokens"] if rows else 0, time.perf_counter() - started,
                       start_step, factor)

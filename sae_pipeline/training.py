"""The training loop: one SAE, one config, read top to bottom.

Schedules (lr warmup + linear decay, sparsity-coefficient warmup), dead-latent tracking (AuxK for TopK),
decoder-norm constraint, a metrics row every `log_every` steps (the only host synchronisation: two reads per row),
and atomic checkpoints that a killed run resumes from exactly. One optimiser step is `training_step`, which
`sae_pipeline.bench` times as it is (`sae_pipeline/step.py`; its cost in matmuls is in `sae_pipeline/kernels.py`).

AuxK is skipped, not multiplied by zero, while no latent can be dead: a latent is dead after `dead_tokens`
tokens without firing, so from the largest tokens-since-fired read at the last log row the loop knows on the
host the first step at which any latent could be dead, and passes no dead mask before it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from sae_pipeline.config import ConfigError, SAEConfig, physical_memory_bytes
from sae_pipeline.progress import FitWindow, GroupProgress
from sae_pipeline.resampling import resample_dead_latents
from sae_pipeline.saes import ForwardOutput, SparseAutoencoder, architecture_class, build_sae
from sae_pipeline.saes.base import geometric_median, normalize_per_token
from sae_pipeline.step import make_optimizer, training_step, update_firing
from sae_pipeline.store import ActivationStore, BatchSampler, Prefetcher

CHECKPOINT_FILE = "checkpoint.pt"
RESAMPLE_INPUTS = 8192
"""Inputs scored to choose replacement directions at each resampling."""
METRIC_COLUMNS = ["step", "tokens", "loss", "mse", "fvu", "sparsity_loss", "aux_loss", "l0", "dead_fraction", "lr"]


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
    """The architecture's penalty coefficient (l1_alpha, l0_coeff for JumpReLU) ramped linearly over
    `l1_warmup_steps`; 0 where sparsity is structural (the TopK family)."""
    alpha = architecture_class(cfg.architecture).penalty_coefficient(cfg)
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


B_DEC_SAMPLE = 8192
"""Training tokens the initial b_dec is computed from."""


def initial_b_dec(cfg: SAEConfig, store: ActivationStore,
                  transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """`b_dec_init` of a sample of B_DEC_SAMPLE transformed training tokens; None (zero) for `zero`."""
    if cfg.b_dec_init == "zero":
        return None
    sample = transform(store.sample(B_DEC_SAMPLE, seed=cfg.seed))
    return geometric_median(sample) if cfg.b_dec_init == "geometric_median" else sample.mean(dim=0)


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
        raise CheckpointMismatchError(f"{path}: checkpoint belongs to another config "
                                      f"({config_differences(state.get('config'), cfg)}); delete it to start over")
    return state


def config_differences(saved: object, cfg: SAEConfig) -> str:
    """Which fields of `cfg` differ from a checkpoint's saved config JSON, and which it lacks (fields added by a
    later version)."""
    try:
        fields = json.loads(saved) if isinstance(saved, str) else {}
    except json.JSONDecodeError:
        fields = {}
    current = json.loads(cfg.model_dump_json())
    differ = [name for name, value in current.items() if name in fields and fields[name] != value]
    lacks = [name for name in current if name not in fields]
    said = ([f"fields that differ: {', '.join(differ)}"] if differ else []) + (
        [f"fields it lacks, added by a later version: {', '.join(lacks)}"] if lacks else [])
    return "; ".join(said) or "unreadable saved config"


@dataclass
class _Member:
    """One config's training state in a group: SAE, optimiser, schedule, firing statistics, log, checkpoint."""

    cfg: SAEConfig
    store: ActivationStore
    sae: SparseAutoencoder
    forward: Callable[..., ForwardOutput]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    transform: Callable[[torch.Tensor], torch.Tensor]
    factor: float
    device: torch.device
    checkpoint_path: Path | None
    log: Callable[[dict], None] | None
    on_checkpoint: Callable[[], None] | None
    tokens_since_fired: torch.Tensor
    window: torch.Tensor
    """loss, recon, sparsity, aux, l0 summed since the last log row."""
    window_steps: int = 0
    rows: list[dict] = field(default_factory=list)
    step: int = 0
    start_step: int = 0
    sampler_state: dict | None = None
    """Where the data stream stood at the checkpoint this member resumed from."""
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    """bf16 autocast or nothing, built once (`autocast_context`)."""
    finished: bool = False
    fit: FitWindow | None = None
    """L0 and FVU since the last progress line (only when progress is shown)."""
    row_fit: FitWindow | None = None
    """L0 and FVU since the last log row: the row's `fvu` (held-out FVU's definition, on training tokens)."""

    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps()

    @property
    def dead_window(self) -> int:
        return min(self.cfg.dead_tokens, self.total_steps * self.cfg.batch_size)

    @classmethod
    def start(cls, cfg: SAEConfig, store: ActivationStore, dev: torch.device, checkpoint_dir: Path | None,
              log: Callable[[dict], None] | None, on_checkpoint: Callable[[], None] | None) -> _Member:
        """A fresh SAE for `cfg`, or the state of its checkpoint in `checkpoint_dir`. `log` gets the checkpoint's
        rows first, so that it sees the whole history of a resumed run (a tracker logs every row)."""
        cfg.validate_for_model(store.d_model)
        torch.manual_seed(cfg.seed)
        transform, factor = input_transform(cfg, store)
        sae = build_sae(cfg, store.d_model)
        sae.initialize(torch.Generator().manual_seed(cfg.seed), b_dec=initial_b_dec(cfg, store, transform))
        sae.to(dev)
        optimizer = make_optimizer(sae, cfg.lr, dev, cfg.adam_betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.total_steps()))
        member = cls(cfg, store, sae, torch.compile(sae) if cfg.torch_compile else sae, optimizer, scheduler,
                     transform, factor, dev, checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None, log,
                     on_checkpoint, torch.zeros(sae.d_sae, dtype=torch.long, device=dev), torch.zeros(5, device=dev))
        member.autocast = autocast_context(cfg, dev)
        member.row_fit = FitWindow(store.d_model, dev)
        state = _load_checkpoint(member.checkpoint_path, cfg) if member.checkpoint_path else None
        if state is not None:
            member.resume(state)
            for row in member.rows if log else ():
                log(row)
        member.sae.train()
        return member

    def resume(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        torch.set_rng_state(state["rng"])
        self.rows, self.step, self.start_step = state["rows"], state["step"], state["step"]
        self.sampler_state = state["sampler"]
        if "window" in state:  # a checkpoint between two log rows carries the partial sums
            self.window.copy_(state["window"])
            self.window_steps = int(state["window_steps"])
        if "row_fit" in state:  # absent before the `fvu` column: that row's FVU covers the steps since the resume
            self.row_fit.load_state_dict(state["row_fit"])

    def train_on(self, raw: torch.Tensor, aux_from: int, sampler_state: dict) -> int:
        """One step on a batch of raw activations; returns the new first step at which AuxK may be needed."""
        cfg, step = self.cfg, self.step
        x = self.transform(raw).to(self.device, non_blocking=True)
        dead_mask = self.tokens_since_fired >= self.dead_window if step >= aux_from else None
        out = training_step(self.sae, self.forward, self.optimizer, x, sparsity_coefficient(cfg, step), dead_mask,
                            cfg.grad_clip, self.autocast, cfg.idle_latents_still)
        self.scheduler.step()
        with torch.no_grad():
            update_firing(self.tokens_since_fired, out, x.shape[0])
            terms = (out.loss, out.recon_loss, out.sparsity_loss, out.aux_loss, out.l0())
            self.window += torch.stack([t.float() for t in terms]).detach()  # float: bf16 autocast mixes dtypes
            self.window_steps += 1
            self.row_fit.add(x, out.recon_loss, terms[4])
            if self.fit is not None:
                self.fit.add(x, out.recon_loss, terms[4])
        self.step = done = step + 1
        self._maybe_resample(done)
        if done % cfg.log_every == 0 or done == self.total_steps:
            aux_from = self._log_row(done)
        if done == self.total_steps:
            self.finished = True
        elif self.checkpoint_path and done % cfg.checkpoint_every == 0 and not self.finished:
            self._checkpoint(sampler_state)
        return aux_from

    def _maybe_resample(self, done: int) -> None:
        cfg = self.cfg
        if resample_due(cfg, done, self.total_steps):
            dead = self.tokens_since_fired >= min(self.dead_window, cfg.resample_every * cfg.batch_size)
            sample = self.transform(self.store.sample(RESAMPLE_INPUTS, seed=cfg.seed + done)).to(self.device)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + done)
            if resample_dead_latents(self.sae, self.optimizer, dead, sample, generator):
                self.tokens_since_fired.masked_fill_(dead, 0)

    def _log_row(self, done: int) -> int:
        """Append a metrics row (the one host read since the last row); stops the member on a stable log.
        Returns the first step at which a latent could be dead."""
        cfg, seen = self.cfg, done * self.cfg.batch_size
        dead_share = (self.tokens_since_fired >= min(self.dead_window, seen)).float().mean()
        wait = steps_until_dead_possible(self.tokens_since_fired, self.dead_window, cfg.batch_size)
        *means, dead_share, wait = torch.cat([self.window / self.window_steps, dead_share[None],
                                              wait[None].float()]).tolist()
        fit = self.row_fit.read()
        row = {"step": done, "tokens": seen, "loss": means[0], "mse": means[1] / self.store.d_model,
               "fvu": fit[1] if fit else math.nan, "sparsity_loss": means[2], "aux_loss": means[3], "l0": means[4],
               "dead_fraction": dead_share, "lr": self.scheduler.get_last_lr()[0]}
        self.rows.append(row)
        if self.log:
            self.log(row)
        self.window.zero_()
        self.window_steps = 0
        self.finished = is_stable(self.rows, cfg.early_stop_window, cfg.early_stop_tolerance)
        return done + int(wait)

    def _checkpoint(self, sampler_state: dict) -> None:
        _save_checkpoint(self.checkpoint_path, {
            "config": self.cfg.model_dump_json(), "step": self.step, "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": sampler_state, "tokens_since_fired": self.tokens_since_fired.cpu(),
            "rng": torch.get_rng_state(), "rows": self.rows,
            "window": self.window.cpu(), "window_steps": self.window_steps, "row_fit": self.row_fit.state_dict(),
        })
        if self.on_checkpoint:
            self.on_checkpoint()

    def result(self, wall_seconds: float) -> TrainResult:
        """The trained SAE on CPU, taking raw activations (the dataset factor folded in)."""
        sae = self.sae.cpu().eval()
        if self.cfg.normalize == "dataset":
            sae.fold_scaling_factor(self.factor)
        metrics = pl.DataFrame(self.rows, schema={c: (pl.Int64 if c in ("step", "tokens") else pl.Float64)
                                                  for c in METRIC_COLUMNS})
        return TrainResult(sae, metrics, self.rows[-1]["tokens"] if self.rows else 0, wall_seconds,
                           self.start_step, self.factor)


def group_key(cfg: SAEConfig, start_step: int = 0) -> tuple[int, int, int]:
    """Configs with equal keys can share one data stream: the same batch size and data order (seed), at the same
    step."""
    return cfg.batch_size, cfg.seed, start_step


def checkpoint_step(checkpoint_dir: Path | None) -> int:
    """The step a config resumes from: its checkpoint's, or 0 when it has none (or an unreadable one, which
    `_Member.start` then reports)."""
    path = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    if path is None or not path.exists():
        return 0
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["step"])
    except Exception:  # reported, with its file name, when the member starts
        return 0


def plan_groups(cfgs: list[SAEConfig], d_model: int, memory_bytes: int | None = None,
                start_steps: list[int] | None = None) -> list[list[int]]:
    """Indices of `cfgs` in groups that can train together: equal `group_key` (with each config's resume step,
    default 0), and together within `memory_bytes` (default: this machine's memory) by
    `SAEConfig.training_bytes`; a group that would not fit is split. A single config that does not fit alone
    is refused by its own validation."""
    memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
    steps = start_steps or [0] * len(cfgs)
    groups: list[list[int]] = []
    by_key: dict[tuple, list[int]] = {}
    for index, (cfg, step) in enumerate(zip(cfgs, steps, strict=True)):
        by_key.setdefault(group_key(cfg, step), []).append(index)
    for members in by_key.values():
        current, used = [], 0
        for index in members:
            need = cfgs[index].training_bytes(d_model)
            if current and used + need > memory:
                groups.append(current)
                current, used = [], 0
            current.append(index)
            used += need
        groups.append(current)
    return groups


LOCKSTEP_BYTES = 64 * 2**20
"""Most memory held by the batches read ahead for a group (`lockstep_batches`)."""


def lockstep_batches(batch_size: int, d_model: int, n_members: int) -> int:
    """Batches a group reads ahead, each then stepped by one member after another: a member's weights and
    optimiser state stay in cache over several steps, where stepping the members in turn on every batch ran
    ~8 % slower than training them one at a time on a 2-core CPU. Up to 8 batches within LOCKSTEP_BYTES (fp32);
    1 for a group of one."""
    if n_members == 1:
        return 1
    return max(1, min(8, LOCKSTEP_BYTES // (batch_size * d_model * 4)))


def train_group(cfgs: list[SAEConfig], store: ActivationStore, device: str = "auto",
                checkpoint_dirs: list[Path | None] | None = None,
                logs: list[Callable[[dict], None] | None] | None = None,
                on_checkpoints: list[Callable[[], None] | None] | None = None,
                progress: Callable[[str], None] | None = None) -> list[TrainResult | Exception]:
    """Train several SAEs in lockstep on one shuffled stream: each batch is read once and stepped by every
    config (a few batches at a time, `lockstep_batches`), which keeps its own optimiser, schedule, statistics,
    early stop, log and checkpoint, so a config trained in a group equals the same config trained alone. A
    config whose start or step raises is dropped from the group and its exception returned in its place; the
    others go on. `group_key` must agree for all. `progress` gets a line every PROGRESS_SECONDS (`progress.py`)."""
    n = len(cfgs)
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = all(cfg.allow_tf32 for cfg in cfgs)
    started = time.perf_counter()
    members: list[_Member | None] = []
    results: list[TrainResult | Exception | None] = [None] * n
    for i, (cfg, directory, log, hook) in enumerate(zip(cfgs, checkpoint_dirs or [None] * n, logs or [None] * n,
                                                        on_checkpoints or [None] * n, strict=True)):
        try:
            members.append(_Member.start(cfg, store, dev, directory, log, hook))
        except (ConfigError, CheckpointMismatchError) as error:  # a bad config or checkpoint fails alone
            members.append(None)
            results[i] = error
    live = [m for m in members if m is not None]
    if not live:
        return results
    keys = {group_key(m.cfg, m.start_step) for m in live}
    if len(keys) > 1:
        raise ConfigError(f"group: configs must share batch_size, seed and resume step to train together; got "
                          f"{sorted(keys)} (train them in separate groups)")
    sampler = BatchSampler(store, live[0].cfg.batch_size, live[0].cfg.seed)
    if live[0].sampler_state is not None:
        sampler.load_state_dict(live[0].sampler_state)
    aux_from = {i: m.step + int(steps_until_dead_possible(m.tokens_since_fired, m.dead_window, m.cfg.batch_size))
                for i, m in enumerate(members) if m is not None}
    n_ahead = lockstep_batches(live[0].cfg.batch_size, store.d_model, len(live))
    tracker = _group_progress(progress, members, store.d_model, dev)
    # on an accelerator the next batches are read while a step computes; on a CPU that would slow the step
    with Prefetcher(sampler, depth=0 if dev.type == "cpu" else 2) as loader:
        while active := [i for i, m in enumerate(members) if m is not None and not m.finished and results[i] is None]:
            batches = [(loader.next_batch(), loader.state_dict()) for _ in range(n_ahead)]
            for i in active:
                for raw, state in batches:
                    if members[i].finished:
                        break
                    try:
                        aux_from[i] = members[i].train_on(raw, aux_from[i], state)
                    except Exception as error:  # one bad config fails alone; its group mates train on
                        results[i] = error
                        break
            if tracker is not None:
                tracker.maybe_emit(max(m.step * m.cfg.batch_size for m in live),
                                   [m.fit if m is not None and results[i] is None else None
                                    for i, m in enumerate(members)])
    wall = time.perf_counter() - started
    return [result if result is not None else member.result(wall) for result, member in
            zip(results, members, strict=True)]


def _group_progress(emit: Callable[[str], None] | None, members: list[_Member | None], d_model: int,
                    device: torch.device) -> GroupProgress | None:
    """The group's progress lines (None without `emit`), each live member given its L0/FVU window."""
    if emit is None:
        return None
    live = [m for m in members if m is not None]
    for member in live:
        member.fit = FitWindow(d_model, device)
    batch = live[0].cfg.batch_size
    return GroupProgress(emit, [m.cfg.partition_key() if m is not None else "" for m in members],
                         max(m.total_steps for m in live) * batch, max(m.step for m in live) * batch)


def train_sae(cfg: SAEConfig, store: ActivationStore, device: str = "auto", checkpoint_dir: Path | None = None,
              log: Callable[[dict], None] | None = None,
              on_checkpoint: Callable[[], None] | None = None) -> TrainResult:
    """Train one SAE on the store's train shards; resume from `checkpoint_dir` if it holds a checkpoint.

    `on_checkpoint` runs after each checkpoint is written (the asset commits it to object storage there).
    """
    (result,) = train_group([cfg], store, device, [checkpoint_dir], [log], [on_checkpoint])
    if isinstance(result, Exception):
        raise result
    return result

"""Progress of a long step for people watching it: a line at most every PROGRESS_SECONDS with what is done of the
total, the rate and the time left (`RateProgress`); a training group's line adds each config's L0 and FVU over
the steps since the last line (`GroupProgress`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from sae_pipeline.markdown import format_duration

PROGRESS_SECONDS = 10.0


class FitWindow:
    """Sums over the steps since the last `read`, kept on the training device so that adding a step reads
    nothing back to the host: squared reconstruction error, input energy, input sum and L0, each per token."""

    def __init__(self, d_in: int, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, recon_loss: torch.Tensor, l0: torch.Tensor) -> None:
        """One step: its (normalised) inputs [batch, d_in], the batch-mean squared error summed over d_in, and
        the batch-mean L0."""
        n, x = x.shape[0], x.float()  # one batch's sums in fp32, accumulated across steps in fp64
        self.sums += torch.stack([recon_loss.float() * n, torch.linalg.vector_norm(x).square(),
                                  l0.float() * n]).double()
        self.x_sum += x.sum(dim=0).double()
        self.tokens += n

    def read(self) -> tuple[float, float] | None:
        """(mean L0, FVU) over the window, FVU = squared error / squared deviation from the window's mean input
        (held-out FVU's definition, on training tokens); None for an empty window. Starts a new window."""
        if not self.tokens:
            return None
        sse, energy, l0_sum = self.sums.tolist()
        spread = energy - self.x_sum.pow(2).sum().item() / self.tokens
        result = l0_sum / self.tokens, sse / spread if spread > 0 else math.nan
        self.sums.zero_()
        self.x_sum.zero_()
        self.tokens = 0
        return result

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The window's sums on the CPU (a checkpoint taken between two reads carries them)."""
        return {"sums": self.sums.cpu(), "x_sum": self.x_sum.cpu(), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.sums.copy_(state["sums"])
        self.x_sum.copy_(state["x_sum"])
        self.tokens = int(state["tokens"])


class RateProgress:
    """Emits `<what> <done> / <total> <unit> (<share>), <rate> <unit>/s, about <time> left` when `every` seconds
    (default PROGRESS_SECONDS) have passed since the last line, or since the start."""

    def __init__(self, emit: Callable[[str], None], what: str, total: int, unit: str, start: int = 0,
                 every: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.emit, self.what, self.total, self.unit, self.start = emit, what, total, unit, start
        self.every, self.clock = PROGRESS_SECONDS if every is None else every, clock
        self.started = self.last = clock()

    def due(self) -> bool:
        """Whether a line is due now."""
        return self.clock() - self.last >= self.every

    def update(self, done: int, detail: Callable[[], str] | None = None) -> None:
        """A line if one is due; `detail()`, computed only then, is appended after a colon."""
        if not self.due():
            return
        now = self.last = self.clock()
        rate = (done - self.start) / max(now - self.started, 1e-9)
        left = format_duration((self.total - done) / rate) if rate > 0 else "unknown"
        extra = detail() if detail is not None else ""
        self.emit(f"{self.what} {done:,} / {self.total:,} {self.unit} ({done / max(self.total, 1):.0%}), "
                  f"{rate:,.0f} {self.unit}/s, about {left} left" + (f": {extra}" if extra else ""))


class GroupProgress(RateProgress):
    """A training group's line: the stream's tokens, and each live config's L0 and FVU since the last line."""

    def __init__(self, emit: Callable[[str], None], labels: Sequence[str], total_tokens: int, start_tokens: int,
                 every: float | None = None, clock: Callable[[], float] = time.perf_counter):
        super().__init__(emit, "training", total_tokens, "tokens", start_tokens, every, clock)
        self.labels = list(labels)

    def maybe_emit(self, done_tokens: int, windows: Sequence[FitWindow | None]) -> None:
        """A line if it is due: `done_tokens` of the stream read so far, each config's window (None for one that
        failed)."""

        def fits() -> str:
            read = [(label, window.read()) for label, window in zip(self.labels, windows, strict=True) if window]
            return "; ".join(f"{label} L0 {fit[0]:.1f} FVU {fit[1]:.3f}" for label, fit in read if fit is not None)

        self.update(done_tokens, fits)


def progress_counter(emit: Callable[[str], None] | None, what: str, total: int, unit: str) -> Callable[[int], None]:
    """A callback adding the units each step of a pass did, with a `RateProgress` line when one is due (a no-op
    without `emit`)."""
    if emit is None:
        return lambda _n: None
    tracker, done = RateProgress(emit, what, total, unit), [0]

    def advance(n: int) -> None:
        done[0] += n
        tracker.update(done[0])

    return advance

"""`python -m sae_pipeline.bench`: our TopK training step against EleutherAI sparsify's and SAELens's own steps.

Every contestant trains a TopK SAE of the same shape (d_in x d_sae, k, batch) with Adam on the same in-memory
activations; the floor (`_floor`: the dense encoder matmul and the fused Adam update alone) is timed in the same
rounds, and each step is reported over it. Within one process the contestants are timed in rounds, the order
rotating every round, so a noisy machine slows them alike; each figure is the median over rounds of the mean step
time in a round. Peak memory is the CUDA allocator's peak on a GPU and, on a CPU, the peak RSS growth of a child
process that runs one contestant alone. The peers are optional (`pip install -e '.[bench]'`); a missing one is
reported as such, never faked.

Runs where only torch is installed (the GPU machine); `--store` (the whole `train_sae` loop on an activation store)
needs the project's dependencies as well.

    python -m sae_pipeline.bench                      # CPU: 384x3072 k32 B1024
    python -m sae_pipeline.bench --device cuda        # 768x24576 k32, 768x98304 k64, 1024x131072 k128 at B4096
    python -m sae_pipeline.bench --store data/activations   # + the train_sae loop, data loading included
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_pipeline.saes.topk import TopKSAE
from sae_pipeline.step import make_optimizer, training_step, update_firing

CPU_SHAPES = ["384x3072:k32:b1024"]
CUDA_SHAPES = ["768x24576:k32:b4096", "768x98304:k64:b4096", "1024x131072:k128:b4096"]
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"
LR = 1e-3

Step = Callable[[], None]


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration."""

    d_in: int
    d_sae: int
    k: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """`384x3072:k32:b1024` -> Shape(384, 3072, 32, 1024)."""
        try:
            dims, k, batch = text.split(":")
            d_in, d_sae = (int(v) for v in dims.split("x"))
            shape = cls(d_in, d_sae, int(k.removeprefix("k")), int(batch.removeprefix("b")))
        except ValueError:
            raise SystemExit(f"--shape: {text!r} is not D_INxD_SAE:kK:bBATCH (e.g. 384x3072:k32:b1024)") from None
        if not 0 < shape.k < shape.d_sae or min(shape.d_in, shape.batch) < 1:
            raise SystemExit(f"--shape: {text!r} needs 0 < k < d_sae and d_in, batch >= 1")
        return shape

    def __str__(self) -> str:
        return f"{self.d_in}x{self.d_sae} k{self.k} B{self.batch}"


@dataclass
class Setup:
    """What every contestant gets: activations, a dead-latent mask, the device."""

    x: torch.Tensor
    dead_mask: torch.Tensor
    device: torch.device
    bf16: bool


def _autocast(setup: Setup) -> contextlib.AbstractContextManager:
    if setup.bf16:
        return torch.autocast(setup.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _ours(kernel: str, before_11: bool = False, compile_step: bool = False) -> Callable[[Shape, Setup], Step]:
    """Our trainer's step (`training_step` + the firing statistics it keeps), with the TopK defaults' hold of idle
    latents (`idle_latents_still`). The trainer passes no dead mask while no latent can be dead; `before_11` is the
    loop as it was before issue 11: a dead mask (so AuxK) every step, the unfused Adam, no hold."""

    def build(shape: Shape, setup: Setup) -> Step:
        sae = TopKSAE(shape.d_in, shape.d_sae, k=shape.k, kernel=kernel)
        sae.initialize(torch.Generator().manual_seed(0), b_dec=setup.x.mean(dim=0).cpu())
        sae.to(setup.device).train()
        optimizer = (torch.optim.Adam(sae.parameters(), lr=LR) if before_11 else
                     make_optimizer(sae, LR, setup.device))
        forward = torch.compile(sae) if compile_step else sae
        since_fired = torch.zeros(shape.d_sae, dtype=torch.long, device=setup.device)
        any_dead = bool(setup.dead_mask.any())
        mask = setup.dead_mask if (any_dead or before_11) else None
        autocast = _autocast(setup)

        def step() -> None:
            out = training_step(sae, forward, optimizer, setup.x, 0.0, mask, 1.0, autocast, not before_11)
            with torch.no_grad():
                update_firing(since_fired, out, shape.batch)
                out.l0()

        return step

    return build


def _sparsify(shape: Shape, setup: Setup) -> Step:
    """sparsify's `Trainer.fit` step for one SAE (fvu loss + AuxK, decoder projection, Adam)."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(shape.d_in, SparseCoderConfig(num_latents=shape.d_sae, k=shape.k), setup.device,
                      dtype=torch.float32)
    sae.b_dec.data = setup.x.mean(dim=0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    did_fire = torch.zeros(shape.d_sae, dtype=torch.bool, device=setup.device)
    autocast = _autocast(setup)

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        with autocast:
            out = sae(setup.x, dead_mask=setup.dead_mask)
        (out.fvu + out.auxk_loss / 32).backward()  # sparsify's default auxk_alpha is 1/32
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _saelens(shape: Shape, setup: Setup) -> Step:
    """SAELens' `SAETrainer._train_step` for a TopK training SAE (its defaults), Adam, grad clipping at 1."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k, device=str(setup.device))
    sae = TopKTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    since_fired = torch.zeros(shape.d_sae, device=setup.device)
    autocast = _autocast(setup)
    state = {"steps": 0}

    def step() -> None:
        with autocast:
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=setup.x, coefficients={}, dead_neuron_mask=setup.dead_mask,
                n_training_steps=state["steps"], is_logging_step=False))
            with torch.no_grad():
                did_fire = out.feature_acts.bool().float().sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        state["steps"] += 1

    return step


def _floor(shape: Shape, setup: Setup) -> Step:
    """The step's floor: the one dense matmul every TopK step pays (the encoder, batch x d_in @ d_in x d_sae, to
    pick the k latents) and the Adam update of the SAE's parameters, fused as our trainer runs it. A step can
    only be faster than this by skipping part of the encoder."""
    sae = TopKSAE(shape.d_in, shape.d_sae, k=shape.k)
    sae.initialize(torch.Generator().manual_seed(0), b_dec=setup.x.mean(dim=0).cpu())
    sae.to(setup.device).train()
    optimizer = make_optimizer(sae, LR, setup.device)
    generator = torch.Generator().manual_seed(1)
    for parameter in sae.parameters():
        parameter.grad = (torch.randn(parameter.shape, generator=generator) * 1e-3).to(setup.device)
    autocast = _autocast(setup)

    def step() -> None:
        with torch.no_grad(), autocast:
            pre = (setup.x - sae.b_dec) @ sae.W_enc
        pre.sum()  # the result is used, as a real step uses it
        optimizer.step()

    return step


FLOOR = "floor: dense encoder matmul + fused Adam"

CONTESTANTS: dict[str, tuple[Callable[[Shape, Setup], Step], str | None]] = {
    FLOOR: (_floor, None),
    "sae_pipeline sparse": (_ours("sparse"), None),
    "sae_pipeline dense (reference)": (_ours("dense"), None),
    "sae_pipeline dense, AuxK every step, unfused Adam (before #11)": (_ours("dense", before_11=True), None),
    "sparsify": (_sparsify, "eai-sparsify"),
    "SAELens": (_saelens, "sae-lens"),
}
COMPILED = "sae_pipeline sparse, torch.compile"
PEER_MODULES = {"sparsify": "sparsify", "SAELens": "sae_lens"}


def _setup(shape: Shape, device: torch.device, dead_fraction: float, bf16: bool) -> Setup:
    generator = torch.Generator().manual_seed(0)
    # correlated Gaussian activations with a mean offset, like a residual stream (not isotropic noise)
    mixing = torch.randn(shape.d_in, shape.d_in, generator=generator) / shape.d_in ** 0.5
    x = torch.randn(shape.batch, shape.d_in, generator=generator) @ mixing + 0.5
    dead = torch.rand(shape.d_sae, generator=generator) < dead_fraction
    return Setup(x.to(device), dead.to(device), device, bf16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_contestants(steps: dict[str, Step], device: torch.device, rounds: int, per_round: int,
                     warmup: int) -> dict[str, float]:
    """Median seconds per step of each contestant, timed in rotating order round by round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            _sync(device)
            started = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            _sync(device)
            samples[name].append((time.perf_counter() - started) / per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def _peak_rss_child(name: str, shape: Shape, args: argparse.Namespace) -> float | None:
    """Peak RSS growth (MiB) of a child process that builds and runs one contestant alone (Linux only)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    command = [sys.executable, "-m", "sae_pipeline.bench", "--memory-probe", name, "--shape", _shape_arg(shape),
               "--dead-fraction", str(args.dead_fraction), "--device", "cpu", "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(f"  memory probe of {name} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


def throughput_table(kind: str, times: dict[str, list[float]], tokens: int, reference: str, against: str) -> str:
    """A markdown table of interleaved timings: per row the median seconds, tokens/s, and the reference row's
    median over this row's (`against` heads that column)."""
    base = statistics.median(times[reference])
    lines = [f"| {kind} | median s | tokens/s | {against} |", "|---|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {tokens / median:,.0f} | {base / median:.2f}x |")
    return "\n".join(lines)


def rss_mib(field: str = "VmHWM") -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Set this process's VmHWM to its current RSS (Linux), so a later peak is that of what runs after."""
    Path("/proc/self/clear_refs").write_text("5")


def _memory_probe(name: str, shape: Shape, args: argparse.Namespace) -> None:
    """Print the peak RSS growth (MiB) while one contestant is built and stepped, after imports and data."""
    setup = _setup(shape, torch.device("cpu"), args.dead_fraction, bf16=False)
    if name in PEER_MODULES:  # the peer's import is not part of its step's memory
        importlib.import_module(PEER_MODULES[name])
    reset_peak_rss()
    before = rss_mib("VmRSS")
    step = _builders()[name](shape, setup)
    for _ in range(max(2, args.warmup)):
        step()
    print(rss_mib() - before)


def _shape_arg(shape: Shape) -> str:
    return f"{shape.d_in}x{shape.d_sae}:k{shape.k}:b{shape.batch}"


def _builders() -> dict[str, Callable[[Shape, Setup], Step]]:
    return {**{name: build for name, (build, _) in CONTESTANTS.items()}, COMPILED: _ours("sparse", compile_step=True)}


def _available(package: str | None) -> str | None:
    """The installed version of a peer, or None."""
    if package is None:
        return "this checkout"
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def bench_shape(shape: Shape, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time every available contestant on one shape; one result row each."""
    setup = _setup(shape, device, args.dead_fraction, args.bf16)
    steps, rows = {}, {}
    names = list(CONTESTANTS) + ([COMPILED] if args.compile else [])
    for name in names:
        package = CONTESTANTS[name][1] if name in CONTESTANTS else None
        if _available(package) is None:
            rows[name] = {"contestant": name, "note": f"not installed (pip install {package})"}
            continue
        try:
            steps[name] = _builders()[name](shape, setup)
        except Exception as error:  # a peer's API change is reported, the others still run
            rows[name] = {"contestant": name, "note": f"failed to build: {type(error).__name__}: {error}"}
    medians = time_contestants(steps, device, args.rounds, args.steps, args.warmup)
    for name, seconds in medians.items():
        rows[name] = {"contestant": name, "ms": seconds * 1000, "tokens_s": shape.batch / seconds}
        if device.type == "cuda":
            rows[name]["peak_mib"] = _cuda_peak(steps[name], device)
        elif not args.no_memory:
            rows[name]["peak_mib"] = _peak_rss_child(name, shape, args)
    return [rows[name] for name in names]


def _cuda_peak(step: Step, device: torch.device) -> float:
    """Peak CUDA memory above what is allocated before one step (MiB)."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench_loop(store_dir: Path, shape: Shape, args: argparse.Namespace) -> list[dict]:
    """The whole `train_sae` loop (data loading, logging, checkpoints off) per kernel, alternating."""
    from sae_pipeline.config import SAEConfig
    from sae_pipeline.store import ActivationStore
    from sae_pipeline.training import train_sae

    store = ActivationStore(store_dir)
    expansion = max(1, shape.d_sae // store.d_model)
    samples: dict[str, list[float]] = {"sparse": [], "dense": []}
    for _ in range(args.loop_repeats):
        for kernel in samples:
            cfg = SAEConfig(architecture=TopKSAE.architecture, k=shape.k, expansion_factor=expansion,
                            batch_size=shape.batch, train_tokens=args.loop_tokens, kernel=kernel, dead_tokens=100_000,
                            log_every=min(20, max(1, args.loop_tokens // shape.batch)))
            result = train_sae(cfg, store, device=args.device)
            samples[kernel].append(result.train_tokens / result.wall_seconds)
    label = f"{store.d_model}x{store.d_model * expansion} k{shape.k} B{shape.batch}, {args.loop_tokens:,} tokens"
    return [{"contestant": f"train_sae loop, {kernel} kernel ({label})", "tokens_s": statistics.median(values),
             "note": f"median of {len(values)} runs on {store_dir}, data loading included"}
            for kernel, values in samples.items()]


def machine() -> str:
    """Device, processor, threads, torch build."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
            else platform.processor()
        device = f"CPU {model}, {os.cpu_count()} cores"
    return f"{device}; torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()}"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per shape and contestant, with the ratio to the fastest peer (tokens/s) and the step time
    over the floor's (`_floor`: 1.00x would be a step that costs only its encoder matmul and Adam update)."""
    lines = ["| shape | contestant | ms/step (median) | tokens/s | peak memory (MiB) | vs fastest peer | "
             "ms / floor ms |", "|---|---|---|---|---|---|---|"]
    for shape, rows in results.items():
        peers = [r["tokens_s"] for r in rows if r["contestant"] in ("sparsify", "SAELens") and "tokens_s" in r]
        best_peer = max(peers) if peers else None
        floor = next((r["ms"] for r in rows if r["contestant"] == FLOOR and "ms" in r), None)
        for row in rows:
            if "tokens_s" not in row:
                lines.append(f"| {shape} | {row['contestant']} | | | | {row['note']} | |")
                continue
            ms = f"{row['ms']:.1f}" if "ms" in row else ""
            peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else ""
            ratio = f"{row['tokens_s'] / best_peer:.2f}x" if best_peer else ""
            over_floor = f"{row['ms'] / floor:.2f}x" if floor and "ms" in row else ""
            note = f" ({row['note']})" if row.get("note") else ""
            lines.append(f"| {shape} | {row['contestant']}{note} | {ms} | {row['tokens_s']:,.0f} | {peak} | {ratio} "
                         f"| {over_floor} |")
    return "\n".join(lines)


def report(results: dict[str, list[dict]], args: argparse.Namespace, load: tuple[float, float]) -> str:
    versions = ", ".join(f"{p} {_available(p) or 'absent'}" for p in ("eai-sparsify", "sae-lens"))
    command = " ".join(["python -m sae_pipeline.bench", *args.argv])
    return (f"\n### `{command}` ({dt.date.today().isoformat()})\n\n"
            f"{machine()}; peers: {versions}; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up "
            f"steps, order rotating; dead latents {args.dead_fraction:.0%}; {'bf16 autocast' if args.bf16 else 'fp32'};"
            f" load average {load[0]:.2f} before, {load[1]:.2f} after.\n\n{table(results)}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sae_pipeline.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--shape", action="append", help="D_INxD_SAE:kK:bBATCH; repeatable (default per device)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=5, help="steps per contestant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contestant first")
    parser.add_argument("--dead-fraction", type=float, default=0.0, help="share of latents marked dead (AuxK)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for every contestant (default: on CUDA only)")
    parser.add_argument("--compile", action="store_true", help="also time our sparse step under torch.compile")
    parser.add_argument("--store", type=Path, help="an activation folder: also time the whole train_sae loop")
    parser.add_argument("--loop-tokens", type=int, default=204_800, help="training tokens per train_sae run")
    parser.add_argument("--loop-repeats", type=int, default=3, help="train_sae runs per kernel (alternating)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS child processes")
    parser.add_argument("--no-append", action="store_true", help=f"print only; do not append to {RESULTS}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file results are appended to")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for name in ("rounds", "steps", "loop_repeats", "loop_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.warmup < 0 or not 0.0 <= args.dead_fraction < 1.0:
        parser.error("--warmup must be >= 0 and --dead-fraction in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu")
    args.device = str(device)
    args.bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    shapes = [Shape.parse(s) for s in (args.shape or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES))]
    if args.memory_probe:
        _memory_probe(args.memory_probe, shapes[0], args)
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {}
    for shape in shapes:
        print(f"{shape}: timing {args.rounds} rounds ...", file=sys.stderr, flush=True)
        results[str(shape)] = bench_shape(shape, args, device)
        if args.store:
            results[str(shape)] += bench_loop(args.store, shape, args)
    text = report(results, args, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_append:
        with args.results.open("a") as handle:
            handle.write(text)
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

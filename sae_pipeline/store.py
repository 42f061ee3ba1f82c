"""The activation store on disk: the shard writer, the memory-mapped reader, the training batch sampler and
the prefetcher.

Layout of an activation folder:
- `train_*.safetensors` / `eval_*.safetensors`: tensors `activations` [n, d_model], `locations` [n, 2] int32
  (sequence id, token position in that sequence) and `norms` [n] float32 (each row's L2 norm before the cast to
  the storage type), one row per non-padding token;
- `meta.json`: model, layer, hook, dtype, d_model, n_tokens, n_train_tokens, n_eval_tokens, `train_shards`,
  `eval_shards` (file name and token count each), the eval sequence ids, and norm statistics of the train slice.
The eval shards hold whole held-out sequences: nothing in them is ever trained on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae_pipeline.config import ConfigError

META_FILE = "meta.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                       "BF16": (np.int16, torch.bfloat16)}
"""safetensors dtype -> (numpy type the memory map is read as, torch type it is viewed as)."""


class StoreError(RuntimeError):
    """An activation folder is missing, truncated or inconsistent; the message names the file."""


def read_meta(folder: Path) -> dict:
    """An activation folder's meta.json; StoreError naming the file when it is missing or not JSON."""
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise StoreError(f"{meta_path}: missing; materialise `activations` first")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{meta_path}: not valid JSON ({error})") from None


HOOKS_DIR = "hooks"
"""Inside the activations folder: the stores of every hook but the first, one folder per hook name."""


def hook_store_dir(activations: Path, hook: str | None, first: str) -> Path:
    """The store of `hook` in an activations folder whose first hook is `first` (None: the first's)."""
    return activations if hook is None or hook == first else activations / HOOKS_DIR / hook


def store_of_hook(activations: Path, hook: str | None) -> Path:
    """The store a config reading `hook` trains on (None: the folder's first hook); ConfigError naming the hooks
    the folder holds when it has none for `hook`."""
    meta = read_meta(activations)
    hooks = meta.get("hooks") or [meta.get("hook_name", f"blocks.{meta['layer']}.hook_resid_post")]
    if hook is not None and hook not in hooks:
        raise ConfigError(f"hook: {hook!r} has no activation store; the activations hold {', '.join(hooks)} "
                          "(extract it: `activations` config `hooks`)")
    return hook_store_dir(activations, hook, hooks[0])


@dataclass
class ShardWriter:
    """Copies token rows into one preallocated shard buffer and writes each full buffer as a safetensors shard
    (`<prefix>_00000.safetensors`, ...), atomically (temp file, then rename). Each shard also holds `norms`
    [n] float32, every row's L2 norm taken before the cast to the storage type.

    One buffer, reused shard after shard, keeps extraction's memory flat: collecting each batch's rows as
    separate tensors and concatenating them left glibc's heap fragmented, and the process grew with the corpus
    (benchmarks/RESULTS.md, issue 24)."""

    folder: Path
    """Where the shards go."""
    prefix: str
    """`train` or `eval`."""
    shard_tokens: int
    """Rows per shard (the last one holds the rest)."""
    dtype: torch.dtype
    """Storage type of `activations`."""
    shards: list[dict] = field(default_factory=list)
    """The shards written so far (file name and token count each); a resumed writer starts from its list."""

    def __post_init__(self) -> None:
        self.pending = 0
        self._acts: torch.Tensor | None = None
        self._locs = torch.empty(self.shard_tokens, 2, dtype=torch.int32)
        self._norms = torch.empty(self.shard_tokens)

    def add(self, acts: torch.Tensor, locs: torch.Tensor) -> bool:
        """Queue rows, writing each shard they fill; whether a shard was written."""
        if self._acts is None:
            self._acts = torch.empty(self.shard_tokens, acts.shape[1], dtype=self.dtype)
        wrote, start = False, 0
        while start < len(acts):
            take = min(len(acts) - start, self.shard_tokens - self.pending)
            rows, into = acts[start:start + take], slice(self.pending, self.pending + take)
            self._acts[into], self._locs[into] = rows, locs[start:start + take]
            torch.linalg.vector_norm(rows.float(), dim=-1, out=self._norms[into])
            self.pending, start = self.pending + take, start + take
            if self.pending == self.shard_tokens:
                self._flush()
                wrote = True
        return wrote

    def close(self) -> list[dict]:
        if self.pending:
            self._flush()
        return self.shards

    @property
    def n_written(self) -> int:
        """Rows in the shards written so far."""
        return sum(shard["n_tokens"] for shard in self.shards)

    def _flush(self) -> None:
        name = f"{self.prefix}_{len(self.shards):05d}.safetensors"
        n = self.pending
        save_atomic({"activations": self._acts[:n], "locations": self._locs[:n], "norms": self._norms[:n]},
                    self.folder / name)
        self.shards.append({"file": name, "n_tokens": n})
        self.pending = 0


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename it: a kill leaves no half-written shard."""
    temp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temp), metadata=metadata)
    os.replace(temp, path)


def read_norms(folder: Path, shard: dict) -> torch.Tensor:
    """A shard's `norms` tensor: each row's L2 norm before the cast to the storage type."""
    with safe_open(str(folder / shard["file"]), framework="pt") as handle:
        return handle.get_tensor("norms")


class ActivationStore:
    """Reader over an activation folder; shards are memory-mapped and read a slice at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
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

    The trainer prefetches when it trains on an accelerator, whose steps leave the CPU idle; on a CPU the
    reading thread competes with the compute threads (measured in benchmarks/RESULTS.md).
    `state_dict` is the sampler state after the last batch handed out (not the thread's position), so a
    checkpoint taken between steps resumes exactly. An error in the thread is raised by `next_batch`.
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

"""Frozen-layer caches: the backbone's frozen leading layers run once per window, not once per epoch.

FrozenCache lives and dies with one run (in memory, or memory-mapped in run_dir). DiskCache
(encoder.cache_dir) is shared across runs, folds and seeds: an entry is found by the content of
the window it was computed from, under a folder named by the frozen weights themselves.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from runtime import amp_dtype
from utils import WriteError, remove_stale_temps, write_atomic
from vocab import window_starts


class FrozenCache:
    """Outputs of the backbone's frozen leading layers per window, computed once.

    Keyed by (entry, window start); each entry holds [width, d] (BOS .. EOS) in `dtype`, in
    memory or in a memory-mapped file (`path`). Valid only while the frozen layers and the input
    sequences stay the same (no augmentation).
    """

    def __init__(self, windows: dict, dim: int, dtype: str = "float32", path=None):
        self.slots, total = {}, 0
        for key, width in windows.items():  # key -> (offset, width)
            self.slots[key] = (total, width)
            total += width
        np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
        if path is None:
            self.store = torch.from_numpy(np.zeros((total, dim), dtype=np_dtype))
        else:
            try:
                store = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(total, dim))
                reserve(path)
            except OSError as err:
                Path(path).unlink(missing_ok=True)  # not a sparse file of the full size left behind
                size = total * dim * np.dtype(np_dtype).itemsize / 1e9
                raise WriteError(f"{path}: cannot write the frozen-layer cache ({size:.2f} GB): "
                                 f"{err.strerror or err}") from None
            self.store = torch.from_numpy(store)
        self.filled = set()
        self.hits = self.misses = 0

    def fetch(self, keys: list, windows: list, compute) -> list:
        """Frozen-prefix outputs [width, d] (float32, on the windows' device) of these windows (token tensors
        [width], BOS .. EOS); computes (compute(list of windows) -> list of [width, d]) and stores the ones not
        cached yet."""
        missing = [w for w, key in enumerate(keys) if key not in self.filled]
        if missing:
            with torch.no_grad():
                fresh = host_copies(compute([windows[w] for w in missing]))
            for values, w in zip(fresh, missing):
                offset, width = self.slots[keys[w]]
                self.store[offset:offset + width] = values.to(self.store.dtype)
                self.filled.add(keys[w])
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        spans = [self.slots[key] for key in keys]
        values = torch.cat([self.store[offset:offset + width] for offset, width in spans])  # one copy to the device
        return list(values.to(windows[0].device, torch.float32, non_blocking=True).split([w for _, w in spans]))


def host_copies(values: list) -> list:
    """Tensors [width, d] (on a device) as float32 CPU tensors, moved in one copy: one wait for the device, not one
    per window."""
    return list(torch.cat(values).float().cpu().split([len(v) for v in values]))


def reserve(path) -> None:
    """Allocate the blocks of a (sparse) file now: on a full disk a memory-mapped file fails later with
    SIGBUS, in the middle of an epoch; reserved, it fails here with ENOSPC. File systems that cannot
    reserve are left as they are."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.path.getsize(path))
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise


class DiskCache:
    """Frozen-layer outputs shared across runs: `root/<model key>/<ab>/<window key>.npy`, [width, d]
    (BOS .. EOS) in `dtype`.

    model key: a hash of the frozen tensors (token embeddings and the layers before the first
    trainable one, names, shapes and values), the frozen depth, the attention code, the autocast
    precision, the storage dtype and the device type (CPU and CUDA kernels round differently); window
    key: a hash of the window's tokens, so the sequence and the windowing are part of it. A changed
    model, depth, precision, storage, device, sequence or window can therefore never read an old entry.
    Each entry is written to a temporary file and renamed: runs filling the folder at the same time
    never read half-written entries (they may compute the same entry twice and write it twice). An
    entry that cannot be read as [width, d] of the storage dtype (damaged by a crash, say) is computed
    and written again.
    """

    def __init__(self, root, model_key: str, dtype: str = "float32"):
        self.folder = Path(root) / model_key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"{self.folder}: cannot create the frozen-layer cache folder: {err.strerror}") from None
        self.dtype = {"float16": np.float16, "float32": np.float32}[dtype]
        self.hits = self.misses = 0
        stale = remove_stale_temps(self.folder)  # entries are written here first, then renamed into <ab>/
        if stale:
            logging.getLogger("mutarget").info("frozen-layer cache: removed %d temporary file(s) of killed runs",
                                               len(stale))

    @staticmethod
    def window_key(tokens: np.ndarray) -> str:
        return hashlib.sha256(tokens.astype(np.uint8).tobytes()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def fetch(self, keys, windows: list, compute) -> list:
        """Frozen-prefix outputs [width, d] (float32, on the windows' device) of these windows (token tensors
        [width]); computes (compute(list of windows) -> list of [width, d]) and stores the ones not cached yet.
        `keys` (entry, start) are not needed: content decides."""
        widths = [len(w) for w in windows]
        rows = np.split(torch.cat(windows).cpu().numpy(), np.cumsum(widths)[:-1])  # one wait for the device
        window_keys = [self.window_key(row) for row in rows]
        found = {}
        for w, key in enumerate(window_keys):
            try:
                values = np.load(self.path(key), allow_pickle=False)
            except (OSError, ValueError, EOFError):  # absent, or unreadable: computed and written again
                continue
            if values.ndim == 2 and values.shape[0] == len(rows[w]) and values.dtype == self.dtype:
                found[w] = values
        missing = [w for w in range(len(rows)) if w not in found]
        if missing:
            with torch.no_grad():
                fresh = host_copies(compute([windows[w] for w in missing]))
            for values, w in zip(fresh, missing):
                found[w] = values.numpy().astype(self.dtype)
                self._store(window_keys[w], found[w])
        self.misses += len(missing)
        self.hits += len(rows) - len(missing)
        values = torch.from_numpy(np.concatenate([found[w] for w in range(len(rows))]).astype(np.float32))
        return list(values.to(windows[0].device, non_blocking=True).split(widths))  # one copy to the device

    def _store(self, key: str, values: np.ndarray) -> None:
        def write(tmp):  # assembled in memory (one window: small), written by Python: a full disk is ENOSPC
            buffer = io.BytesIO()  # (numpy's own file writes say only "N requested and M written")
            np.save(buffer, values, allow_pickle=False)
            with open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
        write_atomic(self.path(key), write, temp_folder=self.folder)  # one folder to clean after a kill


def model_key(backbone, first_trainable: int, attention: str, precision, storage: str, device_type: str) -> str:
    """Hash naming a DiskCache folder: the frozen tensors (embeddings + layers < first_trainable),
    the frozen depth, the attention code ('packed', 'fused' padded or 'fair-esm'), the autocast precision
    (None = fp32), the storage dtype (encoder.cache_dtype) and the device type ('cpu', 'cuda')."""
    digest = hashlib.sha256(repr((first_trainable, attention, str(precision), backbone.token_dropout,
                                  backbone.attention_heads, storage, device_type)).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.startswith("embed_tokens.") or (name.startswith("layers.") and int(name.split(".")[1]) < first_trainable):
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def make_cache(model, datasets: dict, config, rank: int = 0):
    """The frozen-layer cache of a run (train.py has refused configurations where nothing is frozen or
    inputs are mutated): a DiskCache under encoder.cache_dir shared across runs, else a FrozenCache of this
    run holding every window of every split (computed on first use; memory-mapped in run_dir with
    encoder.cache_on_disk)."""
    enc = config.encoder
    device = next(model.parameters()).device
    if enc.cache_dir is not None:
        attention = "packed" if model.packed else "fused" if model.fused_attention else "fair-esm"
        key = model_key(model.backbone, model.first_trainable, attention,
                        amp_dtype(config.train.amp, device), enc.cache_dtype, device.type)
        logging.getLogger("mutarget").info("frozen-layer cache shared across runs: %s", Path(enc.cache_dir) / key)
        return DiskCache(enc.cache_dir, key, enc.cache_dtype)
    windows = {}
    for dataset in datasets.values():
        for protein in dataset.proteins:
            n = len(protein.sequence)
            for start in window_starts(n, config.data.max_len, config.data.overlap):
                windows[(protein.entry, start)] = min(config.data.max_len, n - start) + 2
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / (f"frozen_cache.rank{rank}.npy" if rank else "frozen_cache.npy") if enc.cache_on_disk else None
    return FrozenCache(windows, model.backbone.embed_dim, enc.cache_dtype, path)

"""The frozen-layer cache shared across runs (encoder.cache_dir) and the per-epoch speed figures."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import batch_of, cached_run, make_config, read_metrics

import batching
import cache
import data
import model
from config import resolve_config


def entries(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.npy")}


def test_second_run_reuses_every_frozen_output(tmp_path):
    shared = tmp_path / "shared_cache"
    first = cached_run(tmp_path, "fold0", shared, **{"data.fold": 0})
    assert sum(r["cache_misses"] for r in read_metrics(first)) > 0
    (model_folder,) = [p for p in shared.iterdir() if p.is_dir()]
    filled = entries(model_folder)
    assert filled and not list(shared.rglob("*.tmp"))
    # another fold: every protein was seen by the first run (train, valid or test), so nothing is computed
    second = cached_run(tmp_path, "fold1", shared, **{"data.fold": 1})
    assert [r["cache_misses"] for r in read_metrics(second)] == [0]
    assert all(r["cache_hits"] > 0 for r in read_metrics(second))
    assert entries(model_folder) == filled  # nothing rewritten
    uncached = cached_run(tmp_path, "fold1_plain", None, **{"data.fold": 1})
    for a, b in zip(read_metrics(second), read_metrics(uncached)):
        for key in ("train_loss", "train_class_loss", "train_motif_loss", "val_macro_f1", "val_macro_mcc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    test_a = json.loads((second / "test_metrics.json").read_text())
    test_b = json.loads((uncached / "test_metrics.json").read_text())
    assert test_a["macro_roc_auc"] == pytest.approx(test_b["macro_roc_auc"], abs=1e-4)
    # another backbone (other seed: other random weights) never reads the old entries
    other = cached_run(tmp_path, "other_seed", shared, **{"seed": 7})
    assert read_metrics(other)[0]["cache_misses"] > 0
    assert len([p for p in shared.iterdir() if p.is_dir()]) == 2
    assert entries(model_folder) == filled
    # more frozen layers: another folder too
    cached_run(tmp_path, "deeper", shared, **{"encoder.scratch.num_layers": 3, "encoder.trainable_layers": 1})
    assert len([p for p in shared.iterdir() if p.is_dir()]) == 3
    # the same frozen computation in a bigger model (same seed: the same embeddings and layer 0, 1 layer
    # frozen) is the same key: its outputs are the same, so reusing them is right
    reuse = cached_run(tmp_path, "same_prefix", shared, **{"encoder.scratch.num_layers": 3, "encoder.trainable_layers": 2})
    assert [r["cache_misses"] for r in read_metrics(reuse)] == [0]
    assert len([p for p in shared.iterdir() if p.is_dir()]) == 3


def frozen_prefix(windows):
    """A stand-in for the frozen layers: a fixed function of each window's tokens [width] -> [width, 4]."""
    def one(tokens):
        t = tokens.float()
        return torch.stack([t, t * 2, torch.cos(t), torch.arange(len(t)).float()], dim=-1)
    return [one(w) for w in windows]


def windows(*sequences):
    """The windows (token tensors, BOS .. EOS, as a batch holds them) of these sequences, and their keys."""
    batch = batching.Collate(64, 16)([data.LocalizationDataset([data.make_protein(f"P{i}", s, "", "t")
                                                            for i, s in enumerate(sequences)])[i]
                                  for i in range(len(sequences))])
    return [batch["tokens"][w, :width] for w, width in enumerate(batch["window_widths"])], batch["window_keys"]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_entries_are_keyed_by_window_content(tmp_path):
    store = cache.DiskCache(tmp_path, "model", "float32")
    tokens, keys = windows("MKTAYIAKQR", "MKTAYIAKQW", "MKTAYIAKQRQ")
    out = store.fetch(keys, tokens, frozen_prefix)
    assert store.misses == 3 and len(list(tmp_path.rglob("*.npy"))) == 3  # one residue apart: other entries
    assert same(out, frozen_prefix(tokens))
    # the same windows under other names, in another order: read, not computed
    again_tokens, _ = windows("MKTAYIAKQRQ", "MKTAYIAKQR")
    again = store.fetch([("x", 0), ("y", 0)], again_tokens, lambda t: pytest.fail("recomputed a cached window"))
    assert same(again, frozen_prefix(again_tokens))
    assert store.hits == 2


def test_damaged_or_foreign_entries_are_computed_again(tmp_path):
    """An empty file (a crash mid-write without the rename), a wrong shape or another storage dtype at
    an entry's path is a miss: computed and written again, never a crash or a silent fp16 read."""
    tokens, keys = windows("MKTAYIAKQR", "MLSRAVCGTSRQ", "ACDEFGHIK")
    store = cache.DiskCache(tmp_path, "model", "float32")
    store.fetch(keys, tokens, frozen_prefix)
    paths = sorted(tmp_path.rglob("*.npy"))
    paths[0].write_bytes(b"")
    np.save(paths[1], np.zeros((3, 4), np.float32))  # wrong width
    np.save(paths[2], np.load(paths[2]).astype(np.float16))  # fp16 values under a float32 store
    again = cache.DiskCache(tmp_path, "model", "float32")
    out = again.fetch(keys, tokens, frozen_prefix)
    assert again.misses == 3 and same(out, frozen_prefix(tokens))
    assert same(cache.DiskCache(tmp_path, "model", "float32").fetch(keys, tokens, lambda t: pytest.fail("rewritten?")),
                out)


def test_model_key_covers_storage_device_and_layout(tmp_path):
    """Frozen outputs of another storage, device or attention code (packed, padded: other kernels) are
    other entries; the layout chosen by the config reaches the key."""
    backbone = model.Encoder(resolve_config({"encoder": {"scratch": {"num_layers": 2, "embed_dim": 16,
                                                                           "attention_heads": 2}, "tune": "last_k",
                                                               "trainable_layers": 1}})).backbone
    keys = {cache.model_key(backbone, 1, attention, None, storage, device)
            for storage in ("float16", "float32") for device in ("cpu", "cuda") for attention in ("packed", "fused")}
    assert len(keys) == 8
    folders = set()
    for packed in (True, False):
        config = resolve_config({"encoder": {"scratch": {"num_layers": 2, "embed_dim": 16, "attention_heads": 2},
                                             "tune": "last_k", "trainable_layers": 1, "packed": packed,
                                             "cache_dir": str(tmp_path)}})
        torch.manual_seed(0)
        folders.add(cache.make_cache(model.Encoder(config), {}, config, 0).folder)
    assert len(folders) == 2


def _fill(rank, root, sequences, out):  # noqa: D103
    tokens, keys = windows(*sequences)
    torch.manual_seed(rank)
    order = torch.randperm(len(sequences)).tolist()  # different orders: the processes race on every entry
    store = cache.DiskCache(root, "model", "float16")
    store.fetch([keys[i] for i in order], [tokens[i] for i in order], frozen_prefix)


def test_two_processes_filling_at_once(tmp_path):
    rng = np.random.default_rng(0)
    sequences = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=n)) for n in rng.integers(5, 60, size=40)]
    mp.spawn(_fill, args=(str(tmp_path), sequences, None), nprocs=2)
    assert not list(tmp_path.rglob("*.tmp"))
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == len(set(sequences))
    tokens, keys = windows(*sequences)
    store = cache.DiskCache(tmp_path, "model", "float16")
    out = store.fetch(keys, tokens, lambda t: pytest.fail("an entry is missing"))
    assert same(out, [x.half().float() for x in frozen_prefix(tokens)])
    (tmp_path / "plain").write_text("x")  # the mode open() gives a new file under this umask
    assert all(f.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 for f in files)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-2)])
def test_frozen_cache_matches_uncached(tmp_path, dtype, tol):
    torch.manual_seed(0)
    m = model.Encoder(make_config(tune="last_k", trainable_layers=1)).eval()
    batch = batch_of([30, 12, 45], max_len=20, overlap=6)
    windows = {key: int(n) + 2 for key, n in zip(batch["window_keys"], batch["window_len"])}
    out_plain = m(batch)
    (out_plain["class_logits"].sum() + out_plain["motif_logits"].sum()).backward()
    grads_plain = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.cache = cache.FrozenCache(windows, 32, dtype, path=tmp_path / "cache.npy")
    for attempt in range(2):  # first pass fills the cache, the second reads it only
        m.token_counts.update(dict.fromkeys(m.token_counts, 0))
        out = m(batch)
        # the frozen layers computed every window on the first pass, none on the second (MFU counts this)
        computed = (m.token_counts["prefix_tokens"], m.token_counts["prefix_attention"])
        assert computed == ((m.token_counts["tokens"], m.token_counts["attention"]) if attempt == 0 else (0, 0))
        assert torch.allclose(out["class_logits"], out_plain["class_logits"], atol=tol)
        assert torch.allclose(out["motif_logits"], out_plain["motif_logits"], atol=tol)
    assert m.cache.misses == len(windows) and m.cache.hits == len(windows)
    (out["class_logits"].sum() + out["motif_logits"].sum()).backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == set(grads_plain)
    for name, g in grads_plain.items():
        assert (m.get_parameter(name).grad - g).norm() <= tol * g.norm(), name  # fp16: a ReLU may flip
    assert (tmp_path / "cache.npy").stat().st_size >= sum(windows.values()) * 32 * (2 if dtype == "float16" else 4)


def test_a_full_disk_leaves_no_sparse_cache_and_names_the_file(tmp_path, monkeypatch):
    """encoder.cache_on_disk on a disk without room: WriteError naming the file, and no sparse file of the full
    size left behind; a full cache_dir says "No space left on device" (numpy's own write said only "N requested
    and M written")."""
    import errno
    import os

    from utils import WriteError

    def no_room(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache, "reserve", no_room)
    path = tmp_path / "frozen_cache.npy"
    with pytest.raises(WriteError, match="frozen_cache.npy: cannot write the frozen-layer cache"):
        cache.FrozenCache({("a", 0): 10}, 4, path=path)
    assert not path.exists()
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    store = cache.DiskCache(tmp_path / "shared", "model", "float32")
    real_open = open
    monkeypatch.setattr(cache, "open", lambda tmp, mode: real_open("/dev/full", mode), raising=False)
    tokens, keys = windows("MKTAYIAKQR")
    with pytest.raises(WriteError, match="No space left on device"):
        store.fetch(keys, tokens, frozen_prefix)

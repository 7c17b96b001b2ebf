"""Batches: the collate function (proteins -> backbone windows and protein-level tensors), the samplers
(epoch shuffles, length buckets, each process's slice of a global batch, length-sorted evaluation batches) and
the training split's DataLoader (make_loader)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from config import ConfigError
from runtime import loader_workers
from vocab import BOS_IDX, EOS_IDX, NUM_CLASSES, PAD_IDX, window_starts


class Collate:
    """Batch of proteins -> windows for the backbone plus protein-level tensors.

    Returns tokens [W, T] (BOS + residues + EOS, padded to the longest window of the batch; windows
    longest first), window_protein / window_start / window_len [W], window_widths (host list of W
    token counts, BOS and EOS included), window_keys [(entry, start)] * W, the packed stream of the
    same windows: packed_tokens [N] (N = sum of the widths) and packed_dest [N] (where each token's
    output is stitched: row * L + residue, BOS / EOS to M * L), stream_index [N] (each stream token's place
    in tokens flattened, w * T + t), the fields of pooling and stitching on the stream itself (no [M, L, d]:
    model.pool_stream, stitch_anchors): packed_protein [N] (each token's protein row) and packed_share [N]
    (float32: 1 / windows holding the token's residue, 0 at BOS / EOS), and for the B anchors' residues, flat
    (R = the anchors' lengths summed, anchor after anchor): anchor_tokens [Ta] (the stream positions of their
    residue tokens), anchor_slot [Ta] (each one's row in [R]) and anchor_rows [R] (each row's place
    b * L + residue in [B, L]),
    residue_mask [M, L], labels [B, 8],
    targets [B, 8, L] and target_mask [B, 8, L] (real residues of known tracks), lengths [M],
    indices [M], entries (list of B). M = B for plain batches.

    SupCon (items with 'pos_neg'): the B anchors come first, then every other distinct
    protein the anchors sampled, once each (M proteins in all; dedup=False gives every slot a
    row of its own); group_index [B, 1 + P + N] gives, per anchor, the rows of the anchor, its
    positives and its negatives.
    """

    def __init__(self, max_len: int = 1022, overlap: int = 200, dedup: bool = True):
        if not 0 <= overlap < max_len:
            raise ValueError(f"window overlap {overlap} must be in [0, max_len={max_len})")
        self.max_len, self.overlap, self.dedup = max_len, overlap, dedup

    def __call__(self, items):
        indices = [it["index"] for it in items]
        sequences = [it["tokens"] for it in items]
        entries = [it["entry"] for it in items]
        extended = "pos_neg" in items[0]
        if "views" in items[0]:  # in-batch contrastive losses: V mutated views per anchor, own rows
            groups = []
            for it in items:
                groups.append(list(range(len(indices), len(indices) + len(it["views"]))))
                indices += [it["index"]] * len(it["views"])
                sequences += it["views"]
                entries += [it["entry"]] * len(it["views"])
        elif extended:
            row = {idx: r for r, idx in enumerate(indices) if not items[r].get("mutated")}  # shareable rows
            groups = []
            for anchor_row, it in enumerate(items):
                group = [anchor_row]
                for idx in it["pos_neg"]["pos"] + it["pos_neg"]["neg"]:
                    if idx not in row or not self.dedup:  # dedup=False: every slot its own row
                        row[idx] = len(indices)
                        indices.append(idx)
                        sequences.append(it["pos_neg"]["tokens"][idx])
                        entries.append(it["pos_neg"]["entries"][idx])
                    group.append(row[idx])
                groups.append(group)
        lengths = [len(toks) for toks in sequences]
        windows = []  # (protein, start, token slice)
        for b, toks in enumerate(sequences):
            for s in window_starts(lengths[b], self.max_len, self.overlap):
                windows.append((b, s, toks[s:s + self.max_len]))
        windows.sort(key=lambda w: -len(w[2]))  # longest first (stable): the backbone's order, padded or packed
        widths = [len(w[2]) + 2 for w in windows]  # BOS + residues + EOS
        tokens = torch.full((len(windows), widths[0]), PAD_IDX, dtype=torch.long)
        for w, (_, _, toks) in enumerate(windows):
            tokens[w, 0] = BOS_IDX
            tokens[w, 1:len(toks) + 1] = torch.from_numpy(toks)
            tokens[w, len(toks) + 1] = EOS_IDX
        L = max(lengths)
        # the packed stream: every window's tokens one after the other, and where each token's output goes
        # when stitching (protein row * L + residue; BOS / EOS to the dump row B' * L)
        packed = np.concatenate([tokens[w, :width].numpy() for w, width in enumerate(widths)])
        n_tokens, n_anchors = len(packed), len(items)
        dest = np.full(n_tokens, len(sequences) * L, dtype=np.int64)
        # pooling and the anchors' stitching on the stream itself (model.pool_stream, stitch_anchors): each token's
        # protein and share (1 / windows holding its residue, 0 at BOS / EOS); the anchors' residue tokens and
        # their rows among the anchors' residues (flat, anchor after anchor)
        protein = np.empty(n_tokens, dtype=np.int64)
        share = np.zeros(n_tokens)
        stream_index = np.empty(n_tokens, dtype=np.int64)  # each token's place in tokens [W, T] flattened
        cover = [np.zeros(n) for n in lengths]  # windows holding each residue
        for b, s, toks in windows:
            cover[b][s:s + len(toks)] += 1
        anchor_first = np.cumsum([0] + lengths[:n_anchors])
        anchor_tokens, anchor_slot = [], []
        offset = 0
        for w, ((b, s, toks), width) in enumerate(zip(windows, widths)):
            residues, first = np.arange(s, s + len(toks)), offset + 1
            dest[first:first + len(toks)] = b * L + residues
            protein[offset:offset + width] = b
            share[first:first + len(toks)] = 1.0 / cover[b][s:s + len(toks)]
            stream_index[offset:offset + width] = w * widths[0] + np.arange(width)
            if b < n_anchors:
                anchor_tokens.append(np.arange(first, first + len(toks)))
                anchor_slot.append(anchor_first[b] + residues)
            offset += width
        anchor_rows = np.concatenate([b * L + np.arange(lengths[b]) for b in range(n_anchors)])
        residue_mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
        targets = torch.zeros(len(items), NUM_CLASSES, L)
        for b, it in enumerate(items):
            targets[b, :, :lengths[b]] = torch.from_numpy(it["targets"].astype(np.float32))
        track_mask = torch.from_numpy(np.stack([it["track_mask"] for it in items]))
        batch = {
            "tokens": tokens,
            "window_protein": torch.tensor([w[0] for w in windows]),
            "window_start": torch.tensor([w[1] for w in windows]),
            "window_len": torch.tensor([len(w[2]) for w in windows]),
            "window_widths": widths,  # host list: read without waiting for the device
            "window_keys": [(entries[w[0]], w[1]) for w in windows],  # identify windows across batches
            "packed_tokens": torch.from_numpy(packed),
            "packed_dest": torch.from_numpy(dest),
            "packed_protein": torch.from_numpy(protein),
            "packed_share": torch.from_numpy(share.astype(np.float32)),
            "stream_index": torch.from_numpy(stream_index),
            "anchor_tokens": torch.from_numpy(np.concatenate(anchor_tokens)),
            "anchor_slot": torch.from_numpy(np.concatenate(anchor_slot)),
            "anchor_rows": torch.from_numpy(anchor_rows),
            "residue_mask": residue_mask,
            "labels": torch.from_numpy(np.stack([it["labels"] for it in items]).astype(np.float32)),
            "targets": targets,
            "target_mask": residue_mask[:len(items), None, :] & track_mask[:, :, None],
            "lengths": torch.tensor(lengths),
            "indices": torch.tensor(indices),
            "entries": entries[:len(items)],
        }
        if extended:
            batch["fallback"] = {k: sum(it["pos_neg"][k] for it in items) for k in items[0]["pos_neg"]
                                 if k.startswith("fallback_")}  # host-side counts: reading them never waits
        if extended or "views" in items[0]:
            batch["group_index"] = torch.tensor(groups)
        return batch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): resumed runs replay the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar length, reshuffled every epoch; every sample once per epoch.

    Each epoch: a permutation depending on (seed, epoch) is cut into pools of
    `pool_batches * batch_size` proteins; each pool is sorted by length and cut into batches;
    the batches of all pools are shuffled. Yields lists of indices (a batch_sampler).
    """

    def __init__(self, lengths, batch_size: int, seed: int, pool_batches: int = 64):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.pool = batch_size * pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).numpy()
        batches = []
        for start in range(0, len(perm), self.pool):
            pool = perm[start:start + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([batches[i] for i in order])

    def __len__(self):
        n, pool, size = len(self.lengths), self.pool, self.batch_size
        return sum(-(-min(pool, n - start) // size) for start in range(0, n, pool))


class RankSlice(torch.utils.data.Sampler):
    """This process's part of every global batch, for DistributedDataParallel: the global batch
    sampler (same on every rank, seeded by (seed, epoch)) is cut into `world` near-equal
    contiguous parts and rank r yields part r (never empty: a too-small batch lends its first
    protein). The ranks together see exactly the global batch of a single-process run."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            part = np.array_split(np.asarray(batch), self.world)[self.rank]
            yield part.tolist() if len(part) else [batch[0]]

    def __len__(self):
        return len(self.batches)


def length_sorted_batches(lengths, batch_size: int) -> list[list[int]]:
    """Evaluation batches of similar lengths (less padding); order is restored by indices."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def make_loader(train_set, config, rank: int = 0, world: int = 1, device=torch.device("cpu")):
    """(epoch sampler, DataLoader) of the training split: global batches of train.batch_size,
    shuffled per (seed, epoch), length-bucketed if train.length_buckets; each rank loads its part."""
    if config.train.length_buckets:
        sampler = LengthBucketSampler(train_set.item_lengths(), config.train.batch_size, config.seed)
        batches = sampler
    else:
        sampler = EpochShuffleSampler(len(train_set), config.seed)
        batches = BatchSampler(sampler, config.train.batch_size, drop_last=False)
    if world > 1:
        if config.train.batch_size < world:
            raise ConfigError(f"train.batch_size ({config.train.batch_size}) is the global batch: it must be at "
                              f"least the number of processes ({world})")
        batches = RankSlice(batches, rank, world)
    loader = DataLoader(train_set, batch_sampler=batches, collate_fn=Collate(config.data.max_len, config.data.overlap),
                        num_workers=loader_workers(config.data.num_workers, device), pin_memory=device.type == "cuda")
    return sampler, loader

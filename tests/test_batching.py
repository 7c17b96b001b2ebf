"""Batches (batching.py): collation of windows and masks, epoch samplers, length buckets."""
import numpy as np
import pytest
import torch
from conftest import REAL_DATA
from helpers import protein, window_padding

import batching
import data
import vocab
from vocab import CLASS_INDEX as C


def test_collate_windows_and_masks():
    proteins = [protein("1-5:SIGNAL", length=30), protein("", length=7)]
    proteins[1].entry = "P2"
    ds = data.LocalizationDataset(proteins)
    batch = batching.Collate(max_len=12, overlap=4)([ds[0], ds[1]])
    # protein 0: windows start 0, 8, 16, 18; protein 1: one window
    assert batch["window_protein"].tolist() == [0, 0, 0, 0, 1]
    assert batch["window_start"].tolist() == [0, 8, 16, 18, 0]
    assert batch["tokens"].shape == (5, 14)  # longest window 12 + BOS + EOS, not 1024
    t = batch["tokens"][4]
    assert t[0] == vocab.BOS_IDX and t[8] == vocab.EOS_IDX and (t[9:] == vocab.PAD_IDX).all()
    assert batch["residue_mask"].sum(1).tolist() == [30, 7]
    assert batch["target_mask"][1, :, 7:].sum() == 0 and batch["target_mask"][1, :, :7].all()
    assert batch["targets"][0, C["SIGNAL"]].nonzero().flatten().tolist() == [4]


def test_epoch_sampler_depends_on_seed_and_epoch_only():
    a, b = batching.EpochShuffleSampler(50, 3), batching.EpochShuffleSampler(50, 3)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(123)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared MUTarget data not present")
def test_length_buckets_bound_padding_and_cover_every_sample():
    proteins, partitions = data.load_proteins(REAL_DATA)
    lengths = np.array([len(p.sequence) for p in proteins])[data.fold_indices(partitions, 0)["train"]]
    sampler = batching.LengthBucketSampler(lengths, batch_size=16, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each sample once
        assert max(map(len, batches)) == 16
        assert window_padding(batches, lengths) <= 0.10
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # reshuffled across epochs
    random_batches = [list(range(i, min(i + 16, len(lengths)))) for i in range(0, len(lengths), 16)]
    assert window_padding(random_batches, lengths) > 0.3  # what bucketing saves on this data

"""ChunkShardPlan: coverage, determinism, chunk locality and resume semantics."""

import logging
import math

import numpy as np
import pytest

from data.shards import ChunkShardPlan

WORLDS = [1, 2, 3, 4]
# (num_samples, chunk_size, start): divisible and not by W, partial last chunk, offset split.
SIZES = [(64, 8, 0), (60, 8, 0), (61, 7, 0), (37, 5, 10), (100, 16, 32), (13, 4, 0)]


def plans(n, c, w, start=0, **kw):
    return [ChunkShardPlan(n, c, w, r, start=start, **kw) for r in range(w)]


def all_ranks(n, c, w, epoch, start=0, **kw):
    return [p.epoch_indices(epoch) for p in plans(n, c, w, start, **kw)]


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("n,c,start", SIZES)
@pytest.mark.parametrize("drop_last", [True, False])
def test_coverage(n, c, start, w, drop_last):
    per_rank = all_ranks(n, c, w, epoch=3, start=start, seed=7, drop_last=drop_last)
    expected_len = n // w if drop_last else math.ceil(n / w)
    assert all(len(idx) == expected_len and idx.dtype == np.int64 for idx in per_rank)
    got = np.concatenate(per_rank)
    full = np.arange(start, start + n)
    if n % w == 0:  # every sample exactly once, whatever drop_last says
        np.testing.assert_array_equal(np.sort(got), full)
    elif drop_last:  # at most once, exactly n - n % w distinct
        assert len(np.unique(got)) == len(got) == n - n % w
        assert np.isin(got, full).all()
    else:  # all present, padded by repeats of the stream's first samples
        np.testing.assert_array_equal(np.unique(got), full)
        assert len(got) - n == w - n % w


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("n,c,start", SIZES)
def test_plans_built_independently_agree(n, c, start, w):
    first = plans(n, c, w, start, seed=11)
    second = plans(n, c, w, start, seed=11)
    for epoch in (0, 1, 5):
        for r in range(w):
            a = first[r].epoch_indices(epoch)
            np.testing.assert_array_equal(a, second[r].epoch_indices(epoch))
            # Any rank can compute any other rank's order.
            np.testing.assert_array_equal(a, first[0].epoch_indices(epoch, rank=r))


@pytest.mark.parametrize("w", [1, 3])
def test_order_changes_every_epoch_and_with_seed(w):
    n, c = 61, 7
    orders = [np.concatenate(all_ranks(n, c, w, e, seed=1)) for e in range(4)]
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            assert not np.array_equal(orders[i], orders[j])
    assert not np.array_equal(orders[0], np.concatenate(all_ranks(n, c, w, 0, seed=2)))
    if n % w:  # the dropped tail differs between epochs
        dropped = [np.setdiff1d(np.arange(n), o) for o in orders]
        assert len(np.unique(np.concatenate(dropped))) > n % w


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("n,c,start", SIZES)
def test_each_rank_reads_a_contiguous_run_of_chunks(n, c, start, w):
    ps = plans(n, c, w, start, seed=3, window_chunks=2)
    per_rank_len = ps[0].samples_per_rank
    for epoch in range(3):
        order = ps[0].chunk_order(epoch)
        partial = {
            k for k in order if min((k + 1) * c, start + n) - max(k * c, start) < c
        }
        for p in ps:
            touched = np.unique(p.epoch_indices(epoch) // c)
            pos = np.sort(np.nonzero(np.isin(order, touched))[0])
            np.testing.assert_array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))
            bound = math.ceil(per_rank_len / c) + 1 + len(partial & set(touched.tolist()))
            assert len(touched) <= bound


def test_partial_chunk_inside_a_run_costs_one_more_chunk():
    # chunks [0,4) [4,8) [8,9): with L=3 a rank can straddle a full, the partial and a full chunk.
    found = False
    for seed in range(50):
        for p in plans(9, 4, 3, seed=seed):
            touched = np.unique(p.epoch_indices(0) // 4)
            assert len(touched) <= math.ceil(3 / 4) + 2
            found |= len(touched) == 3
    assert found


@pytest.mark.parametrize("w", [1, 2, 4])
def test_window_shuffle_is_local_and_shuffle_false_is_store_order(w):
    n, c, wc = 96, 4, 3
    p = ChunkShardPlan(n, c, w, w - 1, seed=5, window_chunks=wc)
    stream = p.global_stream(2)[(w - 1) * p.samples_per_rank : w * p.samples_per_rank]
    got = p.epoch_indices(2)
    assert not np.array_equal(got, stream)  # shuffled inside windows ...
    for lo in range(0, len(got), wc * c):  # ... but each window keeps its samples
        np.testing.assert_array_equal(np.sort(got[lo : lo + wc * c]), np.sort(stream[lo : lo + wc * c]))
    flat = ChunkShardPlan(n, c, w, w - 1, shuffle=False)
    L = flat.samples_per_rank
    for epoch in (0, 1):
        np.testing.assert_array_equal(flat.epoch_indices(epoch), np.arange((w - 1) * L, w * L))


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("steps", [[1], [5, 3], [0, 17, 2]])
def test_resume_mid_epoch_yields_exactly_the_unseen_samples(w, steps):
    n, c = 61, 7
    for r in range(w):
        p = ChunkShardPlan(n, c, w, r, seed=9)
        p.set_epoch(2)
        full = p.epoch_indices(2)
        for k in steps:
            p.advance(min(k, p.samples_per_rank - p.cursor - 1))
        seen = full[: p.cursor]
        fresh = ChunkShardPlan(n, c, w, r, seed=9)
        fresh.load_state_dict(p.state_dict())
        assert (fresh.epoch, fresh.cursor) == (2, p.cursor)
        rest = fresh.remaining_indices()
        np.testing.assert_array_equal(np.concatenate([seen, rest]), full)


def test_advance_rolls_over_epochs_and_rejects_overshoot():
    p = ChunkShardPlan(40, 8, 2, 1, seed=0)
    p.advance(15)
    assert (p.epoch, p.cursor) == (0, 15)
    p.advance(5)
    assert (p.epoch, p.cursor) == (1, 0)
    np.testing.assert_array_equal(p.remaining_indices(), p.epoch_indices(1))
    with pytest.raises(ValueError, match="samples_per_rank=20"):
        p.advance(21)
    with pytest.raises(ValueError):
        p.advance(-1)


@pytest.mark.parametrize(
    "n,old_w,new_w,cursor,expect",
    [
        (48, 2, 4, 6, (1, 3)),
        (48, 4, 2, 5, (1, 10)),
        (48, 3, 2, 5, (1, 7)),
        (48, 1, 4, 9, (1, 2)),  # 9 / 4 rounded down
        (50, 1, 4, 49, (2, 0)),  # lands in the new world's dropped tail -> next epoch
    ],
)
def test_world_size_change_resume(n, old_w, new_w, cursor, expect, caplog):
    c = 8
    old = ChunkShardPlan(n, c, old_w, 0, seed=4)
    old.set_epoch(1)
    old.advance(cursor)
    new = ChunkShardPlan(n, c, new_w, new_w - 1, seed=4)
    with caplog.at_level(logging.INFO, logger="fieldtrain.data"):
        new.load_state_dict(old.state_dict())
    assert (new.epoch, new.cursor) == expect
    assert any("world size changed" in rec.getMessage() for rec in caplog.records)
    if expect[1] and (cursor * old_w) % new_w == 0:  # exact: same global count consumed
        assert new.cursor * new_w == cursor * old_w


@pytest.mark.parametrize("field,value", [("num_samples", 50), ("chunk_size", 4), ("seed", 1), ("start", 8)])
def test_load_state_dict_rejects_a_different_dataset(field, value):
    kw = {"num_samples": 48, "chunk_size": 8, "seed": 0, "start": 0}
    state = ChunkShardPlan(world_size=2, rank=0, **kw).state_dict()
    other = ChunkShardPlan(world_size=2, rank=0, **{**kw, field: value})
    with pytest.raises(ValueError, match=rf"{field} differs.*{state[field]}.*{value}"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"world_size": 0, "rank": 0}, "world_size"),
        ({"world_size": 2, "rank": 2}, "rank"),
        ({"world_size": 2, "rank": -1}, "rank"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_samples": 3, "world_size": 4, "rank": 0}, "fewer than world_size"),
        ({"window_chunks": 0}, "window_chunks"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_samples": 16, "chunk_size": 4, "world_size": 1, "rank": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        ChunkShardPlan(**args)

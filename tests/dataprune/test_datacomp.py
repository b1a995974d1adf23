"""DataComp layouts: parquet ``uid`` + ``.npz`` embeddings in, sorted ``u8,u8`` subset out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dataprune.datacomp import open_datacomp, pairs_to_uids, read_subset, uids_to_pairs, write_subset
from dataprune.outofcore import prune_out_of_core


def write_pool(folder, sizes=(700, 500), d=16, seed=0):
    """DataComp-style shards: {i:08d}.parquet (uid, text) + {i:08d}.npz (b32_img, l14_img, ...)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d)).astype(np.float32)
    all_uids, all_rows = [], []
    for i, m in enumerate(sizes):
        uids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (m, 2), dtype=np.uint64)]
        rows = centres[rng.integers(0, 6, m)] + 0.8 * rng.standard_normal((m, d)).astype(np.float32)
        rows[: m // 10] = rows[m // 10 : 2 * (m // 10)] + 0.001  # near-copies inside the shard
        rows = rows.astype(np.float16)
        pd.DataFrame({"uid": uids, "text": ["a caption"] * m}).to_parquet(folder / f"{i:08d}.parquet")
        np.savez(
            folder / f"{i:08d}.npz",
            b32_img=rows,
            b32_txt=rows,
            l14_img=np.zeros((m, 8), np.float16),
            l14_txt=np.zeros((m, 8), np.float16),
        )
        all_uids += uids
        all_rows.append(rows)
    return all_uids, np.concatenate(all_rows)


def reference_pairs(uids):
    """DataComp's own conversion (high, low 16 hex digits), written out longhand."""
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))


def test_uid_pairs_match_datacomps_conversion_and_round_trip():
    uids = ["00000000000000000000000000000000", "ffffffffffffffffffffffffffffffff", "0123456789abcdef" * 2]
    pairs = uids_to_pairs(uids, chunk=2)
    assert np.array_equal(pairs, reference_pairs(uids))
    assert pairs_to_uids(pairs).tolist() == uids
    with pytest.raises(ValueError, match="row 1"):
        uids_to_pairs(["0" * 32, "xyz" + "0" * 29])
    with pytest.raises(ValueError, match="row 0"):
        uids_to_pairs(["abc"])


@pytest.mark.slow
def test_pool_is_read_in_place_and_a_selection_round_trips_as_a_subset(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    uids, rows = write_pool(pool)
    emb, pairs = open_datacomp(pool)
    assert emb.shape == rows.shape and np.array_equal(emb[0 : len(uids)], rows)
    assert np.array_equal(pairs, reference_pairs(uids))
    sel, _ = prune_out_of_core(
        emb, k=6, workdir=tmp_path / "work", eps=0.02, method="ssp", keep=0.8, memory_limit="1MB"
    )
    assert sel.reason_counts()["duplicate"] >= 100  # the planted near-copies
    out = tmp_path / "subset.npy"
    assert write_subset(out, pairs, sel.keep) == sel.n_kept
    subset = read_subset(out)
    assert subset.dtype == np.dtype("u8,u8")
    expected = np.sort(reference_pairs(np.array(uids)[sel.keep]))
    assert np.array_equal(subset, expected)
    assert set(pairs_to_uids(subset)) == {u for u, k in zip(uids, sel.keep) if k}
    assert not list(tmp_path.glob(".subset*"))  # no temporary left behind


def test_datacomp_input_errors(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    uids, _ = write_pool(pool, sizes=(50,))
    with pytest.raises(ValueError, match="no array 'x_img'"):
        open_datacomp(pool, embedding="x_img")
    with pytest.raises(ValueError, match="no 'key' column"):
        open_datacomp(pool, uid_column="key")
    pd.DataFrame({"uid": uids[:49]}).to_parquet(pool / "00000000.parquet")
    with pytest.raises(ValueError, match="mismatched counts"):
        open_datacomp(pool)
    pd.DataFrame({"uid": uids[:49] + uids[:1]}).to_parquet(pool / "00000000.parquet")
    with pytest.raises(ValueError, match="more than once"):
        open_datacomp(pool)
    np.savez_compressed(pool / "00000000.npz", b32_img=np.zeros((50, 4), np.float16))
    with pytest.raises(ValueError, match="compressed"):
        open_datacomp(pool)
    (pool / "00000000.npz").unlink()
    with pytest.raises(FileNotFoundError, match="00000000.npz missing"):
        open_datacomp(pool)
    with pytest.raises(FileNotFoundError):
        open_datacomp(tmp_path / "empty*.parquet")
    unsorted = np.array([(2, 0), (1, 5)], np.dtype("u8,u8"))
    np.save(tmp_path / "bad.npy", unsorted)
    with pytest.raises(ValueError, match="not sorted"):
        read_subset(tmp_path / "bad.npy")
    np.save(tmp_path / "ints.npy", np.arange(3))
    with pytest.raises(ValueError, match="not a DataComp subset"):
        read_subset(tmp_path / "ints.npy")
    with pytest.raises(ValueError, match="does not match"):
        write_subset(tmp_path / "s.npy", unsorted, np.ones(3, bool))

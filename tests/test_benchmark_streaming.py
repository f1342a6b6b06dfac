"""`benchmarks.streaming`'s data file: seeded, written a block at a time, readable mapped."""

from __future__ import annotations

import numpy as np

from benchmarks import streaming


def test_the_data_file_is_seeded_and_written_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_ROWS", 1000)  # several blocks
    a, b, c = (tmp_path / n for n in ("a.npy", "b.npy", "c.npy"))
    streaming.write_data(a, 2500, 3, seed=0)
    streaming.write_data(b, 2500, 3, seed=0)
    streaming.write_data(c, 2500, 3, seed=1)
    x = np.load(a, mmap_mode="r")
    assert isinstance(x, np.memmap) and x.shape == (2500, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.load(b))
    assert not np.allclose(x, np.load(c))
    assert np.isfinite(x).all() and x[2000:].std() > 1.0  # the last, short block is written
    # a mixture: far from one Gaussian (its fourth moment differs from 3 sd^4)
    z = (x - x.mean(0)) / x.std(0)
    assert np.abs((z**4).mean(0) - 3.0).max() > 0.2
    assert streaming._private_bytes() > 0

"""The data sources `fit_density` streams from, written once for both backends (no framework).

`fit_density` takes an in-memory array (its rows go to the device whole), a memory-mapped
array or an iterable of minibatches; `prepare_data` checks, splits and standardises each and
`data_kind` tells them apart:

- **Memory-mapped arrays** (`np.memmap`, as from ``np.load(path, mmap_mode="r")``, or any
  array-like with ``shape``, ``dtype`` and row indexing that is not an in-memory array, such as
  an h5py or zarr data set): the rows split into training and validation rows as an in-memory
  array's (`flowguides.core.split_indices`, whose permutation of the row numbers is held in
  memory). One sequential pass in blocks of
  `STREAM_BLOCK_BYTES` checks that every row is finite and computes the standardisation of the
  training rows; the validation rows are then read once into memory. A minibatch is read by
  `MappedRows.read`: its rows, drawn with replacement as for an in-memory array, are read in
  sorted order (each distinct row once) and put back in draw order. Sorted row indices rather
  than contiguous shuffled blocks: the minibatches stay i.i.d. draws of single rows (a file
  sorted by class or time gives no correlated batches), the same draws as the in-memory array
  for the same seed (so the fit is the same), and a sorted read sweeps the file forwards, which
  the page cache and read-ahead serve best.
- **Iterables of minibatches** (an iterator or generator, or an iterable that is not a list,
  tuple or array, such as a ``DataLoader``): each item is one minibatch ``(n_k, dim)`` (or
  a one-array list, as a ``DataLoader`` over ``TensorDataset(x)`` yields), checked as it
  arrives (`check_batch`). An iterator ends training when it runs out; an
  iterable that is not its own iterator starts again (one epoch after another). The
  standardisation comes from the first minibatch. Validation rows come from
  ``validation_data`` (an in-memory array), or there are none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowguides.core.checks import check_data
from flowguides.core.training import split_indices, standardization

__all__ = [
    "STREAM_BLOCK_BYTES",
    "BatchStream",
    "DataSource",
    "MappedRows",
    "check_batch",
    "data_kind",
    "prepare_data",
]

STREAM_BLOCK_BYTES = 64 * 2**20
"""Bytes read at a time by the pass over a memory-mapped array (as float64)."""


def data_kind(data: Any) -> str:
    """``"array"`` (in memory), ``"mapped"`` (memory-mapped) or ``"stream"`` (minibatches).

    A list or tuple is always rows (``"array"``): pass ``iter(batches)`` to stream a list of
    minibatches. An array-like with ``shape``, ``dtype`` and ``__getitem__`` that is neither a
    `numpy.ndarray` (other than `numpy.memmap`) nor a DLPack array (torch, JAX, CuPy) is
    ``"mapped"``; anything else iterable without a ``shape`` is ``"stream"``.
    """
    if isinstance(data, np.memmap):
        return "mapped"
    if isinstance(data, (np.ndarray, list, tuple, str, bytes)) or hasattr(data, "__dlpack__"):
        return "array"
    if all(hasattr(data, a) for a in ("shape", "dtype", "__getitem__")):
        return "mapped"
    if not hasattr(data, "shape") and isinstance(data, Iterable):
        return "stream"
    return "array"  # np.asarray decides (and check_data names what is wrong)


def check_batch(batch: Any, index: int, dim: int | None, name: str = "data") -> np.ndarray:
    """Minibatch number `index` of a stream as a finite float64 ``(n, dim)`` array (a copy, as
    it is used while the next one is read), or raise. A one-array list or tuple (what a
    ``DataLoader`` over ``TensorDataset(x)`` yields) is its array; a tensor is detached.

    Raises:
        TypeError: the batch is not a floating-point array.
        ValueError: it is not 2-D, has no rows, has other than `dim` columns (when `dim` is
            set) or holds NaN/inf; the message names the batch, its shape and what was expected.
    """
    want = f"(n, {dim})" if dim is not None else "(n, dim)"
    if isinstance(batch, list | tuple) and batch and getattr(batch[0], "ndim", None) == 2:
        if len(batch) > 1:  # a DataLoader over TensorDataset(x, y): (x, y) per batch
            raise TypeError(
                f"{name}: batch {index} is a {type(batch).__name__} of {len(batch)} arrays (as "
                "a DataLoader over TensorDataset(x, y) yields); a density fit reads one array "
                f"{want} per batch: yield it alone (e.g. TensorDataset(x))"
            )
        batch = batch[0]  # a DataLoader over TensorDataset(x) yields [x_batch]
    detach = getattr(batch, "detach", None)  # a torch tensor (that requires grad, on a GPU)
    try:
        arr = np.asarray(detach().cpu() if callable(detach) else batch)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: batch {index} is not an array ({exc}); expected {want}") from None
    where = f"{name}: batch {index} has shape {arr.shape}"
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{where} and dtype {arr.dtype}; expected a floating-point array {want}")
    if arr.ndim != 2:
        raise ValueError(f"{where}; expected a 2-D array {want}")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}; expected at least one row {want}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{where}; expected {want}, the width of the first batch")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if len(bad):
        raise ValueError(f"{where}; {len(bad)} row(s) hold NaN or inf, rows {_shown(bad)}")
    return np.array(arr, dtype=np.float64)  # a copy: an iterator may reuse its buffer


class MappedRows:
    """A memory-mapped array read a minibatch at a time (see the module docstring).

    Args:
        data: the array-like ``(n, dim)``.
        validation_fraction: the share of rows held out, as for an in-memory array.
        seed: seeds the split, as for an in-memory array.
        standardize: standardise with the training rows' mean and standard deviation.

    Raises:
        TypeError: `data` is not numeric.
        ValueError: `data` is not 2-D, has no rows or holds NaN/inf (naming the rows).
    """

    def __init__(self, data: Any, validation_fraction: float, seed: int, standardize: bool):
        shape, dtype = tuple(data.shape), np.dtype(data.dtype)
        if not np.issubdtype(dtype, np.number):
            raise TypeError(f"data: expected a numeric array, got dtype {dtype}")
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"data: expected a 2-D array (n_points, dim), got shape {shape}")
        self.data, self.dim = data, shape[1]
        self.train_idx, self.val_idx = split_indices(shape[0], validation_fraction, seed)
        self.stats = self._pass(standardize)

    def _pass(self, standardize: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """Check every row and return the training rows' standardisation (Chan et al.'s
        pairwise update of mean and sum of squares, block by block)."""
        n = len(self.train_idx) + len(self.val_idx)
        step = max(1, STREAM_BLOCK_BYTES // (8 * max(self.dim, 1)))
        val_sorted = np.sort(self.val_idx)
        count, mean, m2, bad = 0, np.zeros(self.dim), np.zeros(self.dim), []
        for start in range(0, n, step):
            block = np.asarray(self.data[start : start + step], dtype=np.float64)
            bad.extend(start + np.flatnonzero(~np.isfinite(block).all(axis=1)))
            if bad or not standardize:
                continue
            lo, hi = np.searchsorted(val_sorted, [start, start + len(block)])
            keep = np.ones(len(block), bool)
            keep[val_sorted[lo:hi] - start] = False
            rows = block[keep]
            if len(rows):
                delta, total = rows.mean(axis=0) - mean, count + len(rows)
                m2 += ((rows - rows.mean(axis=0)) ** 2).sum(axis=0)
                m2 += delta**2 * count * len(rows) / total
                mean, count = mean + delta * len(rows) / total, total
        if bad:
            raise ValueError(f"data: {len(bad)} row(s) hold NaN or inf, rows {_shown(bad)}")
        if not standardize:
            return None
        std = np.sqrt(m2 / count)
        check_spread(std, mean, n)
        return mean, np.where(std > 0, std, 1.0)

    def _rows(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` of the data (in that order), read in sorted order, standardised."""
        unique, inverse = np.unique(index, return_inverse=True)
        rows = np.asarray(self.data[unique], dtype=np.float64)[inverse.reshape(-1)]
        return rows if self.stats is None else (rows - self.stats[0]) / self.stats[1]

    @property
    def n_train(self) -> int:
        """The number of training rows."""
        return len(self.train_idx)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The standardised float64 minibatch of training rows `rows` (in ``[0, n_train)``)."""
        return self._rows(self.train_idx[np.asarray(rows)])

    def validation(self, limit: int | None = None) -> np.ndarray:
        """The first `limit` (all when None) validation rows, standardised."""
        index = self.val_idx[:limit]
        return self._rows(index) if len(index) else np.zeros((0, self.dim))


class BatchStream(Iterator[np.ndarray]):
    """The checked, standardised minibatches of an iterable (see the module docstring).

    Args:
        data: the iterable of minibatches.
        standardize: standardise with the first minibatch's mean and standard deviation.
        agree: maps those statistics to the ones used (a backend's processes agree on one
            standardisation), or None.

    Raises:
        ValueError: `data` yields no minibatch, or (on iteration) a bad one (`check_batch`).
    """

    def __init__(self, data: Iterable[Any], standardize: bool, agree: Callable | None = None):
        self._data, self._it = data, iter(data)
        self._again = self._it is not data  # an iterable, not an iterator: epochs
        self.index, self.dim = 0, None
        self._first: np.ndarray | None = self._next_raw()
        if self._first is None:
            raise ValueError("data: the iterable yielded no minibatch; expected (n, dim) arrays")
        self.dim = self._first.shape[1]
        stats = standardization(self._first, standardize)
        self.stats = stats if agree is None or stats is None else agree(stats)

    def _next_raw(self) -> np.ndarray | None:
        try:
            raw = next(self._it)
        except StopIteration:
            if not self._again or self.index == 0:
                return None
            self._it = iter(self._data)
            try:
                raw = next(self._it)
            except StopIteration:
                return None
        batch = check_batch(raw, self.index, self.dim)
        self.index += 1
        return batch

    def __next__(self) -> np.ndarray:
        batch, self._first = (self._first, None) if self._first is not None else (None, None)
        batch = self._next_raw() if batch is None else batch
        if batch is None:
            raise StopIteration
        return batch if self.stats is None else (batch - self.stats[0]) / self.stats[1]


@dataclass
class DataSource:
    """What `prepare_data` hands a backend.

    Attributes:
        kind: ``"array"``, ``"mapped"`` or ``"stream"`` (`data_kind`).
        dim: the number of columns.
        stats: the standardisation ``(mean, std)``, or None.
        val: the standardised validation rows ``(n_val, dim)`` (``n_val`` may be 0).
        train: an in-memory array's standardised training rows, else None.
        mapped: a memory-mapped array's `MappedRows`, else None.
        stream: an iterable's `BatchStream`, else None.
    """

    kind: str
    dim: int
    stats: tuple[np.ndarray, np.ndarray] | None
    val: np.ndarray
    train: np.ndarray | None = None
    mapped: MappedRows | None = None
    stream: BatchStream | None = None


def prepare_data(
    data: Any,
    *,
    validation_fraction: float,
    validation_data: Any,
    standardize: bool,
    seed: int,
    validation_rows: int | None,
    agree_stats: Callable | None = None,
) -> DataSource:
    """`fit_density`'s data, checked, split and standardised (see the module docstring).

    Args:
        data: an in-memory or memory-mapped array ``(n, dim)``, or an iterable of minibatches.
        validation_fraction: the share of an array's rows held out (`split_indices`).
        validation_data: an iterable's validation rows ``(n_val, dim)``, or None (no
            validation); must be None for an array.
        standardize: standardise (see the module docstring for the statistics used).
        seed: seeds an array's split.
        validation_rows: keep at most this many validation rows (None: all).
        agree_stats: an iterable's `BatchStream` ``agree`` (None: the first minibatch's).

    Raises:
        TypeError: the data or a minibatch is not numeric (floating, for a minibatch).
        ValueError: bad data (naming the rows or the batch), or `validation_data` given with
            an array or of another width than the minibatches.
    """
    kind = data_kind(data)
    if kind != "stream" and validation_data is not None:
        raise ValueError(
            "validation_data: only for an iterable of minibatches; an array holds out "
            f"validation_fraction ({validation_fraction!r}) of its rows"
        )
    if kind == "array":
        arr = check_data(data)
        check_spread(np.ptp(arr, axis=0), arr[0], arr.shape[0])
        train_idx, val_idx = split_indices(arr.shape[0], validation_fraction, seed)
        stats = standardization(arr[train_idx], standardize)
        if stats is not None:
            arr = (arr - stats[0]) / stats[1]
        val = arr[val_idx[:validation_rows]]
        return DataSource(kind, arr.shape[1], stats, val, train=arr[train_idx])
    if kind == "mapped":
        rows = MappedRows(data, validation_fraction, seed, standardize)
        return DataSource(kind, rows.dim, rows.stats, rows.validation(validation_rows), mapped=rows)
    stream = BatchStream(data, standardize, agree_stats)
    val = np.zeros((0, stream.dim))
    if validation_data is not None:
        val = check_data(validation_data, name="validation_data", dim=stream.dim)[:validation_rows]
        if stream.stats is not None:
            val = (val - stream.stats[0]) / stream.stats[1]
    return DataSource(kind, stream.dim, stream.stats, val, stream=stream)


def check_spread(spread: np.ndarray, values: np.ndarray, rows: int) -> None:
    """Raise unless the data have at least two rows and no constant column (`spread` zero
    there: a density over it is degenerate, its fitted log-likelihood grows without bound)."""
    if rows < 2:
        raise ValueError(f"data: expected at least 2 rows to fit a density, got {rows}")
    constant = np.flatnonzero(np.asarray(spread) == 0)
    if constant.size:
        held = ", ".join(f"{c}: {values[c]:.6g}" for c in constant[:10])
        raise ValueError(
            f"data: column(s) {_shown(constant)} hold one value each ({held}): a density over "
            "a constant column is degenerate (its log-likelihood grows without bound); drop "
            "those columns"
        )


def _shown(rows: Any) -> str:
    rows = list(rows)
    return "[" + ", ".join(map(str, rows[:10])) + (", ...]" if len(rows) > 10 else "]")

"""Streaming and data parallelism for `fit_density` (Pyro): each step's minibatch, and its share
in each process of a `torch.distributed` group.

An in-memory array's minibatches are drawn from its training rows in the training loop, as
always. A memory-mapped array's (the same rows for the same seed, read from the file) and an
iterable's (`flowguides.core.data`) are read one step ahead on a worker thread (`Prefetch`):
minibatch ``k + 1`` is read, checked and made a tensor while step ``k`` runs (PyTorch releases
the interpreter lock inside its operations).

In a process group of more than one process (`process_group`; launched with ``torchrun``, the
group initialised by the caller), an array's global minibatch is drawn alike in every process
and each takes its contiguous share of the rows (reading only those from a memory-mapped
array); an iterable yields each process's own share. The loss runs through
`torch.nn.parallel.DistributedDataParallel` (`data_parallel`), which averages the
gradients; `global_mean` gives every process the mean loss over the processes, so that each
logs, checks and early-stops on the same values.

`fit_posterior`'s mapped training (`flowguides.pyro._training.MappedLoss`) draws each
particle's minibatch of a model's subsampled plates here (`subsampled_plates`,
`draw_indices`), by the rule of the NumPyro backend's ``_fast_subsample``.

The NumPyro backend's ``_stream.py`` runs the whole streamed loop instead (``run_stream``,
compiled a step at a time and double-buffered on the device) and splits minibatches over the
devices of a mesh.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from flowguides.core import WITH_REPLACEMENT_RATIO
from flowguides.core.data import DataSource

__all__ = [
    "Prefetch",
    "agree_stats",
    "all_have",
    "data_parallel",
    "draw_indices",
    "global_mean",
    "minibatches",
    "process_group",
]


class Prefetch(Iterator[Any]):
    """The items of `items`, each fetched on a worker thread while the previous is in use.

    Errors raised while fetching an item surface when that item is asked for. Use it as a
    context manager (or call `close`) to stop the worker.
    """

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowguides-prefetch")
        self._next = self._pool.submit(next, items, None)

    def __next__(self) -> Any:
        item = self._next.result()
        if item is None:
            raise StopIteration
        self._next = self._pool.submit(next, self._items, None)
        return item

    def close(self) -> None:
        """Wait for the fetch under way, then stop the worker."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process_group() -> tuple[int, int] | None:
    """``(rank, world size)`` inside an initialised `torch.distributed` group of more than one
    process, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def minibatches(
    source: DataSource,
    batch: int,
    rng: np.random.Generator,
    dtype: torch.dtype,
    group: tuple[int, int] | None = None,
) -> Iterator[torch.Tensor]:
    """Each step's minibatch: drawn with replacement by `rng` from an in-memory array's or a
    memory-mapped array's training rows (`batch` rows; in a process `group`, this process's
    contiguous share of them), or an iterable's next minibatch.

    The latter two come through a `Prefetch` (close it, or use it as a context manager).
    """

    def draw(n: int) -> np.ndarray:
        rows = rng.integers(0, n, size=batch)
        if group is None:
            return rows
        rank, world = group
        return rows[rank * batch // world : (rank + 1) * batch // world]

    if source.train is not None:
        train = torch.as_tensor(source.train, dtype=dtype)

        def drawn() -> Iterator[torch.Tensor]:
            while True:
                yield train[torch.as_tensor(draw(len(train)))]

        return drawn()
    if source.mapped is not None:
        rows = source.mapped
        hosts = (rows.read(draw(rows.n_train)) for _ in itertools.count())
    else:
        hosts = source.stream
    return Prefetch(torch.as_tensor(host, dtype=dtype) for host in hosts)


class _Loss(torch.nn.Module):
    def __init__(self, trained: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.trained, self.loss_fn = trained, loss_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(x)


def data_parallel(trained: torch.nn.Module, loss_fn: Callable) -> Callable:
    """``loss_fn(x)`` through `DistributedDataParallel` over the parameters of `trained` (each
    used in every step), so that ``backward`` averages their gradients over the processes."""
    return torch.nn.parallel.DistributedDataParallel(_Loss(trained, loss_fn))


def global_mean(*values: torch.Tensor) -> list[float]:
    """The mean of each scalar over the processes (one all-reduce)."""
    total = torch.stack([v.detach().to(torch.float64) for v in values])
    dist.all_reduce(total)
    return (total / dist.get_world_size()).tolist()


def all_have(item: Any) -> bool:
    """Whether every process has its `item` (not None): all stop when one runs out."""
    flag = torch.tensor([0 if item is None else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agree_stats(stats: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Process 0's standardisation, in every process."""
    shared = torch.as_tensor(np.stack(stats))
    dist.broadcast(shared, src=0)
    return shared[0].numpy(), shared[1].numpy()


def subsampled_plates(trace: poutine.Trace) -> dict[str, tuple[int, int]]:
    """``{plate: (size, subsample_size)}`` of the plates of `trace` that draw a subsample
    (a plate given its own ``subsample=`` indices draws none)."""
    out = {}
    for name, site in trace.nodes.items():
        fn = site.get("fn")
        if site_is_subsample(site) and fn.subsample_size and fn.subsample_size < fn.size:
            out[name] = (int(fn.size), int(fn.subsample_size))
    return out


def draw_indices(
    plates: dict[str, tuple[int, int]], num: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Each plate's minibatch for `num` draws, ``(num, subsample_size)``: uniformly with
    replacement where the plate is at least `flowguides.core.WITH_REPLACEMENT_RATIO` times its
    ``subsample_size`` (``O(subsample_size)``), else a uniform subset (``O(size)``)."""
    out = {}
    for name, (size, batch) in plates.items():
        if size >= WITH_REPLACEMENT_RATIO * batch:
            out[name] = torch.randint(size, (num, batch), device=device)
        else:
            out[name] = torch.rand(num, size, device=device).topk(batch, -1).indices
    return out

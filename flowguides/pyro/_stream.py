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
`draw_indices`), by the rule of the NumPyro backend's ``_fast_subsample``, and the start search
runs such a model on all rows, in chunks of its ``subsample_size`` (`full_data_chunks`; mapped
over blocks of chunks by `torch.func.vmap` where that agrees with the loop: `mapped_chunks`).

The NumPyro backend's ``_stream.py`` runs the whole streamed loop instead (``run_stream``,
compiled a step at a time and double-buffered on the device) and splits minibatches over the
devices of a mesh.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from flowguides.core import WITH_REPLACEMENT_RATIO, whole_data_sites
from flowguides.core.data import DataSource

__all__ = [
    "Prefetch",
    "agree_stats",
    "all_have",
    "data_parallel",
    "deterministic_sites",
    "draw_indices",
    "full_data_chunks",
    "global_mean",
    "minibatches",
    "mapped_chunks",
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


def deterministic_sites(trace: poutine.Trace) -> list[str]:
    """The deterministic sites of the model `trace` that `fit.sample` returns: those inside a
    plate that subsamples are left out, with a `SubsampledSiteWarning` (`whole_data_sites`)."""
    sites = {name: [frame.name for frame in site["cond_indep_stack"]]
             for name, site in trace.nodes.items()
             if site["type"] == "sample" and site["infer"].get("_deterministic")}  # fmt: skip
    return whole_data_sites(sites, subsampled_plates(trace))


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


class _Chunk(Messenger):
    """One chunk of the full data: each subsampled plate takes the given indices (its own
    ``subsample_size`` of them, as Pyro requires), its sites lose the plate's
    ``size / subsample_size`` scale and are masked where a last chunk is padded, and every
    site outside the subsampled plates counts in the `first` chunk only. `mapped`: the chunk
    runs under `torch.func.vmap` over chunks, so its rows' mask applies without a look at
    its values (the same log joint)."""

    def __init__(
        self,
        indices: dict[str, tuple[torch.Tensor, torch.Tensor]],
        first: bool,
        mapped: bool = False,
    ):
        super().__init__()
        self.indices, self.first, self.mapped = indices, first, mapped

    def _process_message(self, msg: Any) -> None:
        if msg["type"] != "sample":
            return
        if site_is_subsample(msg):
            if msg["name"] in self.indices:
                msg["value"] = self.indices[msg["name"]][0]
            return
        frames = [f for f in msg["cond_indep_stack"] if f.name in self.indices]
        mask = None if frames or self.first else torch.tensor(False)
        for frame in frames:
            idx, keep = self.indices[frame.name]
            msg["scale"] = msg["scale"] * frame.size / frame.full_size
            if self.mapped or not bool(keep.all()):
                keep = keep.reshape(-1, *(1,) * (-frame.dim - 1))
                mask = keep if mask is None else mask & keep
        if mask is not None:
            msg["mask"] = mask if msg["mask"] is None else msg["mask"] & mask


def full_data_chunks(trace: poutine.Trace) -> list[Callable[[Callable], Callable]] | None:
    """Handlers that together run a model on all rows of its subsampled plates, one chunk of
    ``subsample_size`` rows each (every combination of chunks where several plates
    subsample), or None where no plate of `trace` subsamples or a latent site sits inside
    one (its value is the minibatch's own).

    The sum of the log joints of ``handler(model)`` over the handlers is the full-data log
    joint at scale 1: the start search's target (Pyro's plate checks that a subsample has
    exactly ``subsample_size`` indices, so the full data cannot go through in one call).
    """
    plates = {name: (*sizes, trace.nodes[name]["value"])
              for name, sizes in subsampled_plates(trace).items()}  # fmt: skip
    if not plates:
        return None
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for f in site["cond_indep_stack"]:
            if f.name not in plates:
                continue
            if not site["is_observed"]:
                return None  # a local latent: its value is one minibatch's
            if f.dim is None and plates[f.name][0] % plates[f.name][1]:
                return None  # a sequential plate cannot mask a padded last chunk
    per_plate = []
    for name, (size, batch, proto) in plates.items():
        rows = torch.arange(math.ceil(size / batch) * batch, device=proto.device)
        keep = rows < size
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        per_plate.append([(name, (rows[k : k + batch], keep[k : k + batch]))
                          for k in range(0, rows.numel(), batch)])  # fmt: skip
    combos = list(itertools.product(*per_plate))
    return [_Chunk(dict(combo), first=i == 0) for i, combo in enumerate(combos)]


ROWS_PER_CALL = 2**20
"""`mapped_chunks` maps at most about this many rows x draws at once (one block of chunks)."""


def mapped_chunks(
    chunks: list[_Chunk], evaluate: Callable[[Callable], torch.Tensor], draws: int
) -> torch.Tensor:
    """The sum of ``evaluate(handler)`` over ``chunks[1:]`` (the chunks after the first), mapped
    by `torch.func.vmap` over blocks of chunks: each block is one call of `evaluate` under
    `vmap`, with at most `ROWS_PER_CALL` rows of `draws` draws.

    `evaluate` takes a handler (a `_Chunk` of the block's chunks, with sites outside the
    subsampled plates masked out: the first chunk counts them) and returns the chunk's log
    joint without the Jacobian (it goes with the first chunk too)."""
    rest = chunks[1:]
    names = list(rest[0].indices)
    rows = math.prod(int(rest[0].indices[n][0].numel()) for n in names)
    size = max(1, ROWS_PER_CALL // (rows * max(draws, 1)))

    def one(block: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return evaluate(_Chunk(block, first=False, mapped=True))

    total = None
    for start in range(0, len(rest), size):
        part = rest[start : start + size]
        block = {
            n: tuple(torch.stack([c.indices[n][k] for c in part]) for k in (0, 1)) for n in names
        }
        value = torch.func.vmap(one)(block).sum(0)
        total = value if total is None else total + value
    return total

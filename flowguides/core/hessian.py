"""The probes both backends use for the diagonal of a Hessian: colours from the latent layout.

A model's latent vector packs its sites one after another, each as ``batch + event`` (the
batch dimensions those of its distribution: its plates). Elements of one site along its
batch dimensions often do not interact in the energy (group intercepts, each touched by its
own rows): the block of the Hessian between them is diagonal. Where it is, one product of the
Hessian with a vector that is 1 on all of them gives all their diagonal entries at once,
instead of one product per element (Curtis, Powell & Reid 1974: columns that share no row
can share a probe). Nothing is assumed: a second product, with standard-normal weights on the
same coordinates, tests the block, and a colour whose test fails gets one product per
coordinate (`hessian_diagonal` in each backend).

`hessian_colors` gives every coordinate a colour: the coordinates of a site that differ only
in their batch index share one (one colour per event position); every other coordinate has
its own. `check_tolerance` is the test's tolerance in both backends.

The same products show more. Group the batched sites by batch shape (a family: a plate's
intercepts and slopes); where, in each family, the Hessian is block diagonal over the batch
(element ``g``'s positions interact with each other only), colour ``p``'s ones product at
position ``q`` of element ``g`` is the block entry ``B_g[q, p]`` and its normal product that
entry times the weight of ``(g, p)``: the test, at every coordinate of the family. Where
every entry passes (or both products are negligible there: at most
``tol * sqrt(|H[i, i]| max_j |H[j, j]|)``, a bound on a correlation, as
``|H[i, j]| <= sqrt(H[i, i] H[j, j])`` for a positive definite ``H``) and no colour's products
reach another family's coordinates, the whole Hessian is known (`Blocks`): the blocks, and the
full rows of the `singletons` (the coordinates whose colour is their own), which their unit
products give. The control variate of a subsampled fit (`_control.py` in each backend)
expands to second order with it.

References:
    Curtis, Powell & Reid, "On the estimation of sparse Jacobian matrices", 1974.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "PROBE_SEED",
    "SPARSE_MAX_ELEMENTS",
    "check_tolerance",
    "hessian_colors",
    "probe_weights",
    "shared_rank",
    "Blocks",
    "hessian_blocks",
    "singletons",
    "sparse_layout",
]

PROBE_SEED = 0
"""Seed of the standard-normal weights of the test probes (NumPy's generator): fixed, so both
backends test with the same vectors and a search repeats exactly."""

SPARSE_MAX_ELEMENTS = 2**22
"""Most entries of a sparse Hessian's form (`Blocks.size`) that a start search keeps for the
control variate (`sparse_quadratic` in each backend's `_control.py`)."""


def hessian_colors(
    sites: Sequence[tuple[Sequence[int], Sequence[int]]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(colour of each packed coordinate (d,), whether each colour is shared (C,))``.

    Args:
        sites: per site in packing order, ``(shape of its unconstrained value, batch shape of
            its distribution)``; the value's leading dimensions are the batch where they equal
            it (the rest, the event, in C order within each batch element); a site without
            batch dimensions (or whose value does not start with them) gives each of its
            coordinates its own colour.

    Returns:
        Colours ``0 .. C-1`` in order of first appearance, and for each colour whether more
        than one coordinate has it.
    """
    colors: list[np.ndarray] = []
    count = 0
    for size, batch, _ in _layout(sites):
        if batch <= 1:
            colors.append(count + np.arange(size))
            count += size
        else:
            colors.append(count + np.tile(np.arange(size // batch), batch))
            count += size // batch
    out = np.concatenate(colors).astype(np.int64) if colors else np.zeros(0, np.int64)
    return out, np.bincount(out, minlength=count) > 1


def _layout(
    sites: Sequence[tuple[Sequence[int], Sequence[int]]],
) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """Per site, ``(its number of coordinates, its batch size, its batch shape)``; the batch
    size is 1 where the value does not start with the batch shape (`hessian_colors`)."""
    for shape, batch_shape in sites:
        shape, batch_shape = tuple(int(n) for n in shape), tuple(int(n) for n in batch_shape)
        batched = bool(batch_shape) and shape[: len(batch_shape)] == batch_shape
        yield math.prod(shape), math.prod(batch_shape) if batched else 1, batch_shape


def probe_weights(colors: np.ndarray, shared: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The probe vectors ``(2 S, d)`` of the ``S`` shared colours (in colour order): first,
    per shared colour, 1 on its coordinates; then, per shared colour, standard-normal weights
    (`PROBE_SEED`) on its coordinates. (A colour of one coordinate needs no probe of its own:
    its product is that with the unit vector.)"""
    ids = np.flatnonzero(shared)
    ones = (colors[None, :] == ids[:, None]).astype(dtype)
    normal = np.random.default_rng(PROBE_SEED).standard_normal(colors.shape[0]).astype(dtype)
    return np.concatenate([ones, ones * normal[None, :]])


def shared_rank(shared: np.ndarray) -> np.ndarray:
    """Per colour, its row among `probe_weights`'s ones probes (-1 for a colour of one)."""
    return np.where(shared, np.cumsum(shared) - 1, -1)


def check_tolerance(dtype: np.dtype) -> float:
    """Relative tolerance of the test: a colour's block is diagonal where, at each of its
    coordinates ``i``, ``|(H g)_i - h_i g_i| <= tol * (|(H g)_i| + |h_i g_i|)`` (``h`` from
    the ones probe, ``g`` the normal weights): ``eps ** 0.4`` of the dtype, above the rounding
    of a product summed over many data rows."""
    return float(np.finfo(dtype).eps ** 0.4)


def singletons(colors: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The packed coordinates whose colour is their own (no batch shares it), in order."""
    color, shared = colors
    return np.flatnonzero(~shared[color])


class Blocks(NamedTuple):
    """Where a sparse Hessian's entries lie: the `singletons`' full rows, and per family of
    batched sites (the sites of one batch shape) a ``k x k`` block per batch element, ``k``
    their event positions together (`hessian_blocks`)."""

    singletons: np.ndarray
    """The packed coordinates whose colour is their own, ``(s,)``."""
    families: tuple[np.ndarray, ...]
    """Per batch shape, the packed coordinates ``(G, k)`` of each batch element's positions."""

    def size(self, dim: int) -> int:
        """Entries of the sparse form: ``s x dim`` rows and ``G x k x k`` per family."""
        return len(self.singletons) * dim + sum(f.shape[0] * f.shape[1] ** 2 for f in self.families)


def hessian_blocks(sites: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Blocks:
    """The `Blocks` of the packed layout of `sites` (as `hessian_colors` reads them): the
    batched sites of one batch shape form a family, whose batch element ``g`` holds the
    event positions of each of its sites, in packing order."""
    single: list[np.ndarray] = []
    families: dict[tuple[int, ...], list[np.ndarray]] = {}
    offset = 0
    for size, batch, batch_shape in _layout(sites):
        coords = offset + np.arange(size)
        if batch <= 1:
            single.append(coords)
        else:
            families.setdefault(batch_shape, []).append(coords.reshape(batch, size // batch))
        offset += size
    return Blocks(
        np.concatenate(single).astype(np.int64) if single else np.zeros(0, np.int64),
        tuple(np.concatenate(parts, axis=1).astype(np.int64) for parts in families.values()),
    )


def sparse_layout(
    colors: tuple[np.ndarray, np.ndarray] | None, blocks: Blocks | None, dim: int
) -> bool:
    """Whether a start search keeps the sparse form of its Hessian (`Blocks`): the layout
    has a shared colour and the form holds at most `SPARSE_MAX_ELEMENTS` entries."""
    if colors is None or blocks is None or not np.any(colors[1]):
        return False
    return blocks.size(dim) <= SPARSE_MAX_ELEMENTS

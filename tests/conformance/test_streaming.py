"""`fit_density` on a memory-mapped array or an iterable of minibatches, in both backends.

A memory-mapped array fits the same flow as the in-memory array for the same seed, reading a
few rows at a time; an iterator's fit beats the initial flow on held-out data, validates on
``validation_data`` up to the step the iterator ran out at, and a bad minibatch is refused with
an error that names its index, its shape and what was expected.
"""

from __future__ import annotations

import numpy as np
import pytest

import flowguides.core.data as core_data
from flowguides import FlowSpec

SPEC = FlowSpec.realnvp(2, hidden=[16], dtype="float64")
BACKENDS = [pytest.param("pyro", marks=pytest.mark.torch), pytest.param("numpyro")]


def banana(n: int, seed: int) -> np.ndarray:
    """A curved 2-D density that no Gaussian fits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return np.c_[x, 0.5 * x**2 + 0.3 * rng.normal(size=n)]


def backend(name: str):
    """``(fit_density, build_flow, DensityFit)`` of a backend."""
    if name == "pyro":
        from flowguides.pyro import fit_density
        from flowguides.pyro.build import build_flow
        from flowguides.pyro.density import DensityFit
    else:
        from flowguides.numpyro import fit_density
        from flowguides.numpyro.build import build_flow
        from flowguides.numpyro.density import DensityFit
    return fit_density, build_flow, DensityFit


def batches(seed: int, size: int = 64):
    """An endless generator of fresh banana minibatches, as a data loader would yield them."""
    rng = np.random.default_rng(seed)
    while True:
        yield banana(size, int(rng.integers(2**31)))


class RowCountingArray:
    """An out-of-core array-like (shape, dtype, row indexing) that records each read's rows
    and refuses to be read whole."""

    def __init__(self, data: np.ndarray) -> None:
        self._data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, index):
        rows = self._data[index]
        self.reads.append(len(rows))
        return rows

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array was read")


@pytest.mark.parametrize("name", BACKENDS)
def test_a_memory_mapped_array_fits_as_the_in_memory_array(name, tmp_path, monkeypatch):
    fit_density, _, _ = backend(name)
    data = banana(400, 0)
    np.save(tmp_path / "data.npy", data)
    mapped = np.load(tmp_path / "data.npy", mmap_mode="r")
    settings = {"num_steps": 60, "batch_size": 32, "learning_rate": 1e-2, "progress": False}
    in_memory = fit_density(data, SPEC, seed=3, **settings)
    from_file = fit_density(mapped, SPEC, seed=3, **settings)
    for key in ("train", "val"):
        np.testing.assert_allclose(from_file.losses[key], in_memory.losses[key], rtol=1e-10)
    np.testing.assert_allclose(from_file.log_prob(data[:50]), in_memory.log_prob(data[:50]))
    np.testing.assert_allclose(from_file.mean, in_memory.mean, rtol=1e-12)
    assert np.ptp(from_file.losses["train"]) > 0.1  # it trained
    # read a block or a minibatch at a time, never whole: 16-row blocks, 32-row batches, and
    # the 40 validation rows (10 %) read once
    monkeypatch.setattr(core_data, "STREAM_BLOCK_BYTES", 16 * 2 * 8)
    counting = RowCountingArray(data)
    again = fit_density(counting, SPEC, seed=3, **settings)
    np.testing.assert_allclose(again.losses["train"], in_memory.losses["train"], rtol=1e-10)
    assert max(counting.reads) == 40 and len(counting.reads) > 60


@pytest.mark.parametrize("name", BACKENDS)
def test_an_iterator_fit_beats_the_initial_flow_and_validates_on_validation_data(name):
    fit_density, build_flow, DensityFit = backend(name)
    val, test = banana(200, 1), banana(1000, 2)
    fit = fit_density(
        batches(0), SPEC, validation_data=val, num_steps=80, learning_rate=2e-2, progress=False
    )
    initial = DensityFit(build_flow(SPEC, 2, seed=0), SPEC, {}, fit.mean, fit.std)
    assert -fit.log_prob(test).mean() < -initial.log_prob(test).mean() - 0.5
    # the standardisation is the first minibatch's
    np.testing.assert_allclose(fit.mean, next(batches(0)).mean(axis=0))
    # an iterator that runs out ends training, validated after its last step (6); the
    # returned flow is the best on validation_data (the losses are in the standardised scale)
    seven = iter([banana(40, k) for k in range(7)])
    short = fit_density(seven, SPEC, validation_data=val, num_steps=80, progress=False)
    assert len(short.losses["train"]) == 7 and len(short.losses["val"]) == 2
    nll = -short.log_prob(val).mean() - np.log(short.std).sum()
    np.testing.assert_allclose(nll, short.losses["val"].min(), rtol=1e-10)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.ones((32, 3)), ValueError, r"batch 3 has shape \(32, 3\); expected \(n, 2\)"),
        (np.ones((32, 2), dtype=np.int64), TypeError, r"batch 3 .* dtype int64; expected a float"),
        (np.ones((0, 2)), ValueError, r"batch 3 has shape \(0, 2\); expected at least one row"),
        (np.ones(2), ValueError, r"batch 3 has shape \(2,\); expected a 2-D array \(n, 2\)"),
        (np.c_[np.ones(4), [0, np.nan, 0, np.inf]], ValueError, r"batch 3 .* rows \[1, 3\]"),
    ],
)
def test_an_iterator_refuses_a_bad_minibatch_naming_it(name, bad, error, message):
    fit_density, _, _ = backend(name)
    good = [banana(32, k) for k in range(3)]
    with pytest.raises(error, match=message):
        fit_density(iter([*good, bad]), SPEC, num_steps=10, progress=False)


@pytest.mark.parametrize("name", BACKENDS)
def test_validation_data_is_only_for_an_iterable_and_must_match_its_width(name):
    fit_density, _, _ = backend(name)
    with pytest.raises(ValueError, match="validation_data: only for an iterable"):
        fit_density(banana(50, 0), SPEC, validation_data=banana(10, 1), progress=False)
    with pytest.raises(ValueError, match=r"validation_data: expected 2 columns, got shape"):
        fit_density(batches(0), SPEC, validation_data=np.ones((10, 3)), progress=False)
    with pytest.raises(ValueError, match="yielded no minibatch"):
        fit_density(iter([]), SPEC, progress=False)


@pytest.mark.torch
@pytest.mark.parametrize("name", BACKENDS)
def test_a_torch_dataloader_over_a_tensordataset_trains_epoch_after_epoch(name):
    """What a PyTorch user writes: ``DataLoader(TensorDataset(x), batch_size, shuffle=True)``
    yields ``[x_batch]`` per batch (a one-tensor list); it trains like the arrays it holds,
    and one over ``TensorDataset(x, y)`` is refused by name."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    fit_density, build_flow, DensityFit = backend(name)
    x = torch.as_tensor(banana(256, 0)).requires_grad_()  # as a user's tensors may be
    loader = DataLoader(TensorDataset(x), batch_size=64, shuffle=True)
    val, test = banana(200, 1), banana(1000, 2)
    fit = fit_density(loader, SPEC, validation_data=val, num_steps=80, learning_rate=2e-2,
                      progress=False)  # fmt: skip
    assert len(fit.losses["train"]) == 80  # four batches an epoch: the loader starts again
    initial = DensityFit(build_flow(SPEC, 2, seed=0), SPEC, {}, fit.mean, fit.std)
    assert -fit.log_prob(test).mean() < -initial.log_prob(test).mean() - 0.5
    pairs = DataLoader(TensorDataset(x, x[:, 0]), batch_size=64)
    with pytest.raises(TypeError, match=r"batch 0 is a list of 2 arrays .*TensorDataset\(x\)"):
        fit_density(pairs, SPEC, num_steps=5, progress=False)

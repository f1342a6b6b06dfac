"""The plots write non-empty PNGs (Agg), from arrays and from numpy stand-ins for fits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest

from flowguides import plots

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class NormalFit:
    """Fit protocol: guide N(0, scale^2 I_2) for the posterior N(0, I_2); losses that fall."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        steps = np.arange(400)
        self.losses = 5 * np.exp(-steps / 80) + np.random.default_rng(0).normal(0, 0.1, 400)

    def sample(self, num_samples: int, seed: int | None = None):
        z = self.scale * np.random.default_rng(seed).normal(size=(num_samples, 2))
        return {"mu": z[:, 0], "theta": z[:, 1:]}

    def log_densities(self, num_samples: int, seed: int | None = None):
        draws = self.sample(num_samples, seed)
        z = np.concatenate([draws["mu"][:, None], draws["theta"]], axis=1)
        log_p = -0.5 * (z**2).sum(-1)
        log_q = -0.5 * ((z / self.scale) ** 2).sum(-1) - 2 * math.log(self.scale)
        return draws, log_p, log_q


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plot_losses_from_fit_array_and_train_val(tmp_path):
    plots.plot_losses(NormalFit(1.0), path=tmp_path / "fit.png")
    assert_png(tmp_path / "fit.png")
    fig = plots.plot_losses(
        {"train": np.linspace(3, 1, 500), "val": np.linspace(3.2, 1.1, 20)},
        path=tmp_path / "density.png",
    )
    assert_png(tmp_path / "density.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]
    # the validation curve is spread over the 500 training steps
    assert ax.lines[-1].get_xdata()[-1] == pytest.approx(475)
    # a fit that stopped before its first validation: the training curve alone
    fig = plots.plot_losses({"train": [1.0, 2.0], "val": []})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["train"]
    with pytest.raises(ValueError, match="losses: expected at least one value"):
        plots.plot_losses({"train": [], "val": []})


def test_plot_pair_over_reference(tmp_path):
    fit = NormalFit(0.5)
    reference = NormalFit(1.0).sample(1000, seed=1)
    fig = plots.plot_pair(fit, reference, max_points=500, path=tmp_path / "pair.png")
    assert_png(tmp_path / "pair.png")
    labels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert labels == ["mu", "theta[0]"]
    # the lower-left panel holds the reference scatter, then the flow's
    scatter = fig.axes[2].collections
    assert len(scatter) == 2 and len(scatter[1].get_offsets()) == 500
    # reference sites in another order (NUTS's model order) are matched by name
    shuffled = {"theta": reference["theta"], "mu": reference["mu"]}
    fig = plots.plot_pair(fit, shuffled, max_points=500)
    np.testing.assert_allclose(
        fig.axes[2].collections[0].get_offsets(),
        plots.plot_pair(fit, reference, max_points=500).axes[2].collections[0].get_offsets(),
    )
    plots.plot_pair(np.random.default_rng(0).normal(size=(300, 3)), path=tmp_path / "arr.png")
    assert_png(tmp_path / "arr.png")
    with pytest.raises(ValueError, match=r"reference: expected coordinates \['mu', 'theta\[0\]'\]"):
        plots.plot_pair(fit, {"mu": np.zeros(10)})
    with pytest.raises(ValueError, match=r"draws: expected draws of shape \(S, dim\)"):
        plots.plot_pair(np.zeros(10))


@pytest.mark.parametrize(("scale", "verdict"), [(0.995, "good"), (0.3, "unreliable")])
def test_plot_khat_from_fit(tmp_path, scale, verdict):
    fig = plots.plot_khat(NormalFit(scale), num_samples=2000, seed=1, path=tmp_path / "k.png")
    assert_png(tmp_path / "k.png")
    assert fig._suptitle.get_text().startswith(verdict)
    # an `infer` result stands for its fit
    result = SimpleNamespace(route="guide", fit=NormalFit(scale), draws={})
    title = plots.plot_khat(result, num_samples=2000, seed=1)._suptitle.get_text()
    assert title == fig._suptitle.get_text()


def test_plot_khat_constant_weights(tmp_path):
    fig = plots.plot_khat(np.full(200, 1.5), path=tmp_path / "const.png")
    assert_png(tmp_path / "const.png")
    assert "weights are constant" in fig._suptitle.get_text()

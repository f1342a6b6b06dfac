"""Plots for judging a fit: loss curve, pair plot of draws over reference draws, k-hat summary.

Each function returns the matplotlib `Figure`; with ``path`` it also writes the file (PNG, SVG,
PDF: by its extension) and closes the figure, so scripts do not pile up open figures. Without
``path`` the figure stays open for ``plt.show()`` or a notebook. matplotlib is imported when a
function runs, so ``import flowguides`` stays light.

ArviZ has no loss-curve plot, its pair plots differ between its 0.x and 1.x lines and cannot lay
reference draws under flow draws, and its ``plot_khat`` shows pointwise LOO k-hats rather than
the single k-hat of a guide; so these plots use matplotlib directly and look the same on both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from os import PathLike
from typing import Any

import numpy as np

from flowguides.diagnostics import diagnose_weights, psis_khat

__all__ = ["plot_density_2d", "plot_khat", "plot_losses", "plot_pair"]

_FLOW_COLOR = "C0"
_REFERENCE_COLOR = "0.55"


def _pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: str | PathLike | None) -> Any:
    if path is not None:
        fig.savefig(path, dpi=110)
        _pyplot().close(fig)
    return fig


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_losses(
    losses: Any, *, window: int | None = None, path: str | PathLike | None = None
) -> Any:
    """Loss curve: each step's loss, faint, under its moving average.

    Args:
        losses: a fit (its ``.losses``), an array of losses, or ``{"train": ..., "val": ...}``
            (a density fit's); a shorter series (validation, evaluated every few steps) is
            spread evenly over the training steps.
        window: moving-average width (default ``max(1, steps // 50)``).
        path: where to save the figure.

    Returns:
        The matplotlib figure.
    """
    losses = getattr(_fit_of(losses), "losses", losses)
    series = dict(losses) if isinstance(losses, Mapping) else {"loss": losses}
    series = {name: np.asarray(value, dtype=np.float64).ravel() for name, value in series.items()}
    if not any(value.size for value in series.values()):
        raise ValueError(f"losses: expected at least one value, got none in {list(series)}")
    # a short fit may end before its first validation: plot what there is
    series = {name: value for name, value in series.items() if value.size}
    steps = max(value.size for value in series.values())
    window = max(1, steps // 50) if window is None else int(window)
    fig, ax = _pyplot().subplots(figsize=(6.4, 3.6))
    shown = []
    for i, (name, value) in enumerate(series.items()):
        x = np.arange(value.size) * (steps / value.size)
        smooth = _moving_average(value, max(1, window * value.size // steps))
        ax.plot(x, value, color=f"C{i}", alpha=0.25, linewidth=0.8)
        ax.plot(x, smooth, color=f"C{i}", linewidth=1.8, label=name)
        shown.append(smooth[np.isfinite(smooth)])
    finite = np.concatenate(shown)
    if finite.size:  # ignore early spikes: the range of the smoothed curves after 5% of steps
        tail = np.concatenate([s[s.size // 20 :] for s in shown if s.size])
        low, high = finite.min(), tail.max()
        pad = 0.05 * (high - low) if high > low else 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (negative ELBO)" if "loss" in series else "loss")
    ax.legend(frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def _fit_of(obj: Any) -> Any:
    """`infer`'s result stands for its fit (losses, log densities)."""
    return obj.fit if hasattr(obj, "route") and hasattr(obj, "fit") else obj


def _columns(draws: Any, name: str, num_samples: int, seed: int) -> tuple[list[str], np.ndarray]:
    held = [getattr(draws, a, None) for a in ("draws", "samples")]  # `infer`'s, `neutra`'s
    draws = next((d for d in held if isinstance(d, Mapping)), draws)
    if hasattr(draws, "sample") and not isinstance(draws, Mapping | np.ndarray):
        draws = draws.sample(num_samples, seed=seed)
    if not isinstance(draws, Mapping):
        arr = np.asarray(draws, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{name}: expected draws of shape (S, dim), got shape {arr.shape}")
        draws = {"x": arr}
    labels, columns = [], []
    for site, value in draws.items():
        arr = np.asarray(value, dtype=np.float64)
        flat = arr.reshape(arr.shape[0], -1)
        if arr.ndim == 1:
            labels.append(site)
        else:
            labels += [f"{site}[{', '.join(map(str, i))}]" for i in np.ndindex(arr.shape[1:])]
        columns.append(flat)
    return labels, np.concatenate(columns, axis=1)


def plot_pair(
    draws: Any,
    reference: Any = None,
    *,
    max_dims: int = 6,
    max_points: int = 2000,
    seed: int = 0,
    path: str | PathLike | None = None,
) -> Any:
    """Pair plot of flow draws (scatter below the diagonal, histograms on it), over reference.

    Args:
        draws: a fit (``fit.sample(max_points, seed=seed)`` is drawn), ``{site: (S, *shape)}``,
            or an array ``(S, dim)``.
        reference: draws of the same form and sites, e.g. from NUTS, drawn underneath in grey.
        max_dims: show at most this many (flattened) coordinates, the first ones.
        max_points: scatter at most this many draws of each.
        seed: seed for the fit's draws and the subsampling.
        path: where to save the figure.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: the draws are not ``(S, ...)`` arrays, or the reference has other coordinates.
    """
    labels, flow = _columns(draws, "draws", max_points, seed)
    ref = None
    if reference is not None:
        ref_labels, ref = _columns(reference, "reference", max_points, seed)
        if sorted(ref_labels) != sorted(labels):
            raise ValueError(f"reference: expected coordinates {labels}, got {ref_labels}")
        ref = ref[:, [ref_labels.index(label) for label in labels]]  # matched by name
    rng = np.random.default_rng(seed)

    def thin(arr: np.ndarray) -> np.ndarray:
        keep = rng.permutation(arr.shape[0])[:max_points]
        return arr[np.sort(keep), :max_dims]

    flow, labels = thin(flow), labels[:max_dims]
    ref = None if ref is None else thin(ref)
    dim = len(labels)
    fig, axes = _pyplot().subplots(dim, dim, figsize=(1.9 * dim + 1, 1.9 * dim + 1), squeeze=False)
    for i in range(dim):
        for j in range(dim):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                both = flow[:, i] if ref is None else np.concatenate([flow[:, i], ref[:, i]])
                bins = np.histogram_bin_edges(both, bins=30)
                if ref is not None:
                    ax.hist(ref[:, i], bins, density=True, color=_REFERENCE_COLOR, alpha=0.6)
                ax.hist(flow[:, i], bins, density=True, histtype="step", color=_FLOW_COLOR)
                ax.set_yticks([])
            else:
                if ref is not None:
                    ax.scatter(ref[:, j], ref[:, i], s=2, color=_REFERENCE_COLOR, alpha=0.4)
                ax.scatter(flow[:, j], flow[:, i], s=2, color=_FLOW_COLOR, alpha=0.4)
            if i == dim - 1:
                ax.set_xlabel(labels[j])
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
    title = "flow draws (blue)" + ("" if ref is None else " over reference draws (grey)")
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def plot_khat(
    source: Any,
    *,
    num_samples: int = 4000,
    seed: int | None = None,
    path: str | PathLike | None = None,
) -> Any:
    """k-hat summary: k-hat against the good / usable / unreliable bands, and the weight tail.

    The right panel shows the largest fifth of the normalised importance weights against their
    rank on log scales, raw and PSIS-smoothed: a Pareto tail of shape k is a line of slope
    ``-k``; a flat top means a few draws carry most of the weight.

    Args:
        source: a posterior fit (``fit.log_densities(num_samples, seed)`` is drawn) or an array
            of log-weights ``log p - log q``.
        num_samples: number of draws from a fit.
        seed: seed for the fit's draws.
        path: where to save the figure.

    Returns:
        The matplotlib figure.
    """
    source = _fit_of(source)
    if hasattr(source, "log_densities"):
        _, log_p, log_q = source.log_densities(num_samples, seed)
        log_weights = np.asarray(log_p, dtype=np.float64) - np.asarray(log_q, dtype=np.float64)
    else:
        log_weights = np.asarray(source, dtype=np.float64)
    diagnosis = diagnose_weights(log_weights, np.zeros_like(log_weights))
    smoothed, _ = psis_khat(log_weights)
    threshold, khat = diagnosis.khat_threshold, diagnosis.khat
    fig, (band, tail) = _pyplot().subplots(1, 2, figsize=(9, 3.4))
    low, high = -0.5, 1.5
    good_end = min(0.5, threshold)
    band.axvspan(low, good_end, color="tab:green", alpha=0.3)
    band.axvspan(good_end, threshold, color="gold", alpha=0.4)
    band.axvspan(threshold, high, color="tab:red", alpha=0.3)
    if math.isnan(khat):
        band.text(
            0.5,
            0.5,
            "k-hat: nan\n(constant or tied weights)",
            ha="center",
            va="center",
            transform=band.transAxes,
        )
    else:
        band.axvline(min(max(khat, low), high), color="k", linewidth=2)
    band.set_xlim(low, high)
    band.set_yticks([])
    band.set_xlabel("Pareto k-hat")
    band.set_title(f"k-hat {khat:.2f}, threshold {threshold:.2f} (S = {diagnosis.num_samples})")
    top = max(log_weights.size // 5, 5)  # the largest 20%: PSIS fits the top min(S/5, 3 sqrt S)
    rank = np.arange(1, top + 1)
    raw = np.sort(log_weights)[::-1]
    raw = raw - (raw[0] + np.log(np.exp(raw - raw[0]).sum()))
    tail.loglog(rank, np.exp(raw[:top]), ".", markersize=3, color="0.4", label="raw")
    tail.loglog(rank, np.exp(np.sort(smoothed)[::-1][:top]), "-", color=_FLOW_COLOR, label="PSIS")
    tail.set_xlabel("rank")
    tail.set_ylabel("normalised weight")
    tail.set_title(f"ESS {diagnosis.ess:.0f} of {diagnosis.num_samples}")
    tail.legend(frameon=False)
    fig.suptitle(diagnosis.verdict.split(";")[0])
    fig.tight_layout()
    return _finish(fig, path)


def plot_density_2d(
    log_prob: Any,
    data: Any,
    *,
    grid_size: int = 120,
    path: str | PathLike | None = None,
) -> Any:
    """Contours of a 2-D density with the data drawn over it.

    Args:
        log_prob: a density fit (its ``.log_prob``) or a function ``(n, 2) array -> (n,)``.
        data: the ``(n, 2)`` points to overlay (at most 2,000 are drawn).
        grid_size: grid points per axis; the grid spans the data with a 10% margin.
        path: where to write the figure.
    """
    fn = getattr(log_prob, "log_prob", log_prob)
    points = np.asarray(data, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"data: expected shape (n, 2), got {points.shape}")
    lo, hi = points.min(0), points.max(0)
    pad = 0.1 * (hi - lo) + 1e-9
    axes = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], grid_size) for i in range(2)]
    xx, yy = np.meshgrid(*axes)
    density = np.exp(np.asarray(fn(np.stack([xx.ravel(), yy.ravel()], axis=1)))).reshape(xx.shape)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.contourf(xx, yy, density, levels=20, cmap="viridis")
    shown = points[:: max(1, len(points) // 2000)]
    ax.scatter(shown[:, 0], shown[:, 1], s=2, c="white", alpha=0.5, linewidths=0)
    ax.set_title("fitted density with the data")
    return _finish(fig, path)

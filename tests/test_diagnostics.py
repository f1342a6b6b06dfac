"""Diagnostics against closed forms, with numpy fits standing in for the backends.

Runs on both ArviZ lines (0.x `InferenceData`, 1.x `DataTree`); needs neither torch nor jax.
For ``q = N(0, r^2)`` against ``p = N(0, 1)`` the weights have a Pareto tail of shape
``k = 1 - r^2`` (``P(w > t) ~ t^(-1 / (1 - r^2))``), which the k-hat tests check.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from flowguides import diagnostics as dg
from flowguides.core import choose_route
from flowguides.core.results import NeuTraResult
from flowguides.psis import _import_arviz

S = 4000


def log_normal(x: np.ndarray, loc: float, scale: float) -> np.ndarray:
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * math.log(2 * math.pi)


def gaussian_weights(loc: float, scale: float, seed: int = 0, size: int = S):
    """Draws from q = N(loc, scale^2) and log p - log q for p = N(0, 1) (times e^3)."""
    x = loc + scale * np.random.default_rng(seed).normal(size=size)
    return x, log_normal(x, 0.0, 1.0) + 3.0 - log_normal(x, loc, scale)


class ConjugateFit:
    """The fit protocol in numpy for ``mu ~ N(0, 2^2)``, ``y_i ~ N(mu, 1)``, ``theta ~ N(0, I_2)``.

    The guide is ``N(post_mean + shift, (scale * post_sd)^2)`` for ``mu`` and ``N(shift,
    scale^2 I)`` for ``theta``; ``shift=0, scale=1`` is the exact posterior.
    """

    prior_sd = 2.0

    def __init__(self, shift: float = 0.0, scale: float = 1.0, n: int = 20) -> None:
        self.y = np.random.default_rng(123).normal(1.5, 1.0, size=n)
        precision = 1 / self.prior_sd**2 + n
        self.post_sd = precision**-0.5
        self.post_mean = self.y.sum() / precision
        self.shift, self.scale = shift, scale
        self.losses = np.linspace(50.0, 10.0, 300)

    def log_densities(self, num_samples: int, seed: int | None = None):
        rng = np.random.default_rng(seed)
        q_loc, q_sd = self.post_mean + self.shift * self.post_sd, self.scale * self.post_sd
        mu = q_loc + q_sd * rng.normal(size=num_samples)
        theta = self.shift + self.scale * rng.normal(size=(num_samples, 2))
        draws = {"mu": mu, "theta": theta}
        log_p = (
            log_normal(mu, 0.0, self.prior_sd)
            + log_normal(theta, 0.0, 1.0).sum(-1)
            + self.log_likelihood(draws)["y"].sum(-1)
        )
        log_q = log_normal(mu, q_loc, q_sd) + log_normal(theta, self.shift, self.scale).sum(-1)
        return draws, log_p, log_q

    def sample(self, num_samples: int, seed: int | None = None):
        return self.log_densities(num_samples, seed)[0]

    def log_likelihood(self, draws):
        return {"y": log_normal(self.y[None, :], draws["mu"][:, None], 1.0)}

    def observed_data(self):
        return {"y": self.y}


class GaussianDensityFit:
    """The density-fit protocol for N(1, 2^2 I_3)."""

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        return 1.0 + 2.0 * np.random.default_rng(seed).normal(size=(n, 3))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return log_normal(x, 1.0, 2.0).sum(-1)


def test_khat_threshold_formula():
    assert dg.khat_threshold(100) == pytest.approx(0.5)
    assert dg.khat_threshold(1000) == pytest.approx(2 / 3)
    assert dg.khat_threshold(10**6) == 0.7
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 25, got 10"):
        dg.khat_threshold(10)


def test_importance_ess_closed_form():
    # half the weights 1, half 3: (sum w)^2 / sum w^2 = (2n)^2 / (5n) for 2n draws
    lw = np.log(np.repeat([1.0, 3.0], 500)) - 7.0
    assert dg.importance_ess(lw) == pytest.approx(0.8 * 1000)
    assert dg.importance_ess(np.full(50, -2.0)) == pytest.approx(50)


@pytest.mark.parametrize("scale", [0.3, 0.6, 0.9])
def test_khat_matches_the_pareto_tail_of_gaussian_weights(scale):
    _, lw = gaussian_weights(0.0, scale)
    smoothed, khat = dg.psis_khat(lw)
    assert khat == pytest.approx(1 - scale**2, abs=0.12)
    # normalised, and smoothing keeps the order of the weights (catches a sign slip)
    assert np.exp(smoothed).sum() == pytest.approx(1.0)
    assert np.argmax(smoothed) == np.argmax(lw)
    assert np.corrcoef(smoothed, lw)[0, 1] > 0.99


def test_psis_khat_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"2 value\(s\) are NaN or inf, at draws \[3, 7\]"):
        lw = np.zeros(100)
        lw[[3, 7]] = [np.nan, np.inf]
        dg.psis_khat(lw)
    with pytest.raises(ValueError, match=r"expected a 1-D array \(num_samples,\), got shape"):
        dg.psis_khat(np.zeros((10, 10)))
    with pytest.raises(ValueError, match="expected at least 25 draws, got 5"):
        dg.psis_khat(np.zeros(5))


@pytest.mark.parametrize("noise", [0.0, 1e-12])
def test_q_equal_to_p_reports_constant_weights(noise):
    x, lw = gaussian_weights(0.0, 1.0)
    assert np.ptp(lw) < 1e-12  # q = p up to the constant e^3
    smoothed, khat = dg.psis_khat(lw + noise * x)
    assert math.isnan(khat)
    np.testing.assert_allclose(smoothed, -math.log(S))
    diagnosis = dg.diagnose_weights(log_normal(x, 0, 1) + noise * x, log_normal(x, 0, 1))
    assert "weights are constant: q matches p up to a constant" in diagnosis.verdict
    assert diagnosis.reliable and diagnosis.ess == pytest.approx(S)
    assert "k-hat    nan" in str(diagnosis)


def test_close_guide_is_good():
    x, _ = gaussian_weights(0.0, 0.99)
    diagnosis = dg.diagnose_weights(log_normal(x, 0, 1), log_normal(x, 0, 0.99))
    assert diagnosis.khat < 0.5
    assert diagnosis.verdict.startswith("good") and diagnosis.reliable
    assert diagnosis.ess > 0.99 * S
    # ELBO = -KL(q || p) for normalised p, in closed form
    kl = math.log(1 / 0.99) + (0.99**2 - 1) / 2
    assert diagnosis.elbo == pytest.approx(-kl, abs=4 * diagnosis.elbo_se)


@pytest.mark.parametrize(("sd", "ess"), [(1.5, 0.83), (4.0, 0.35)])
def test_a_wide_guide_with_light_tailed_weights_is_usable_not_good(sd, ess):
    """q = N(0, sd^2) against p = N(0, 1): the weights are bounded (k-hat < 0.5: the weighted
    estimates are sound), but their ESS is sqrt(2 sd^2 - 1) / sd^2 of the draws, so q's own
    draws are off by up to the weights' cv in sds of q: not "good" (cv > 0.1)."""
    x = sd * np.random.default_rng(3).normal(size=S)
    diagnosis = dg.diagnose_weights(log_normal(x, 0, 1), log_normal(x, 0, sd))
    assert diagnosis.khat < 0.5 and diagnosis.reliable
    assert diagnosis.ess / S == pytest.approx((2 * sd**2 - 1) ** 0.5 / sd**2, abs=0.04)
    assert diagnosis.ess / S == pytest.approx(ess, abs=0.04)
    cv = (S / diagnosis.ess - 1) ** 0.5
    assert diagnosis.verdict.startswith(f"usable: k-hat {diagnosis.khat:.2f} < 0.5, but the ")
    assert f"cv is {cv:.2f} > 0.10 (ESS {diagnosis.ess / S:.0%}" in diagnosis.verdict
    # the advice agrees with `infer`'s route: PSIS up to a cv of 1 (ESS half the draws), else
    # NeuTra, the corrected estimates resting on few draws
    route = choose_route(diagnosis.khat, weight_cv=cv)[0]
    assert route == ("psis" if sd == 1.5 else "neutra")
    assert ("prefer the PSIS-corrected" in diagnosis.verdict) == (route == "psis")
    assert ("run NeuTra (fit.neutra)" in diagnosis.verdict) == (route == "neutra")


def test_narrow_guide_is_unreliable():
    x, _ = gaussian_weights(0.0, 0.3)
    diagnosis = dg.diagnose_weights(log_normal(x, 0, 1), log_normal(x, 0, 0.3))
    assert diagnosis.khat > 0.7 and diagnosis.khat_threshold == pytest.approx(0.7)
    assert diagnosis.verdict.startswith("unreliable") and not diagnosis.reliable
    assert diagnosis.ess < 0.2 * S
    table = str(diagnosis)
    assert f"{diagnosis.khat:.2f} (threshold 0.70 for S = 4000)" in table
    assert "unreliable" in table


def test_funnel_against_a_narrowed_normal_is_unreliable():
    """Neal's 10-D funnel, v ~ N(0, 3^2), x_i ~ N(0, e^v), against q = N(0, diag(1.5^2, 1, ...))."""
    scale = np.array([1.5] + [1.0] * 9)
    z = scale * np.random.default_rng(0).normal(size=(S, 10))
    v, x = z[:, 0], z[:, 1:]
    log_p = log_normal(v, 0, 3.0) + log_normal(x, 0, np.exp(v / 2)[:, None]).sum(-1)
    diagnosis = dg.diagnose_weights(log_p, log_normal(z, 0, scale).sum(-1))
    assert diagnosis.khat > 0.7 and diagnosis.verdict.startswith("unreliable")


def test_usable_verdict_between_half_and_threshold():
    x, _ = gaussian_weights(0.0, 0.75)  # k = 1 - 0.75^2 = 0.44 in theory
    lw = log_normal(x, 0, 1) - log_normal(x, 0, 0.75)
    khat = dg.psis_khat(lw)[1]
    verdict = dg.diagnose_weights(log_normal(x, 0, 1), log_normal(x, 0, 0.75)).verdict
    assert khat < 0.7 and verdict.split(":")[0] == "usable"  # k-hat >= 0.5, or the weights' cv
    # a small S lowers the threshold: the same k-hat is unreliable with 100 draws
    x, lw = gaussian_weights(0.0, 0.5, size=100)
    small = dg.diagnose_weights(lw, np.zeros(100))
    assert small.khat_threshold == pytest.approx(0.5)
    assert small.reliable == (small.khat < 0.5)


def test_diagnose_weights_checks_shapes():
    with pytest.raises(ValueError, match=r"expected equal shapes, got \(30,\) and \(31,\)"):
        dg.diagnose_weights(np.zeros(30), np.zeros(31))


@pytest.mark.parametrize("seed", range(4))
def test_is_corrected_means_beat_raw_means_on_a_poor_guide(seed):
    x, lw = gaussian_weights(1.0, 0.5, seed=seed)  # shifted and narrow: k = 0.75
    assert dg.psis_khat(lw)[1] > 0.6
    means, sds = dg.is_moments({"x": x}, lw)
    assert abs(means["x"]) < 0.5 * abs(x.mean())
    assert abs(sds["x"] - 1.0) < abs(x.std() - 1.0)


def test_is_moments_and_resampling_recover_p_from_a_wide_guide():
    x, lw = gaussian_weights(0.5, 1.5, seed=2)
    draws = {"x": x, "pair": np.stack([x, 2 * x], axis=-1)}
    means, sds = dg.is_moments(draws, lw)
    tol = 4 / math.sqrt(dg.importance_ess(dg.psis_khat(lw)[0]))
    np.testing.assert_allclose(means["pair"], [0.0, 0.0], atol=2 * tol)
    np.testing.assert_allclose(sds["pair"], [1.0, 2.0], atol=2 * tol)
    resampled = dg.resample(draws, lw, 3000, seed=0)
    assert resampled["pair"].shape == (3000, 2)
    np.testing.assert_array_equal(resampled["pair"][:, 1], 2 * resampled["x"])
    assert resampled["x"].mean() == pytest.approx(0.0, abs=2 * tol)
    assert resampled["x"].std() == pytest.approx(1.0, abs=2 * tol)
    assert np.isin(resampled["x"], x).all()
    np.testing.assert_array_equal(
        dg.resample(draws, lw, 10, seed=5)["x"], dg.resample(draws, lw, 10, seed=5)["x"]
    )


def test_resample_checks_draws():
    _, lw = gaussian_weights(0.0, 1.2, size=100)
    with pytest.raises(ValueError, match=r"site 'b': expected a leading axis of 100 draws"):
        dg.resample({"a": np.zeros(100), "b": np.zeros((99, 2))}, lw, 10)
    with pytest.raises(ValueError, match="num_samples: expected a positive integer, got 0"):
        dg.resample({"a": np.zeros(100)}, lw, 0)


def test_diagnose_fit_good_and_poor():
    good = dg.diagnose(ConjugateFit(shift=0.1, scale=1.05), num_samples=2000, seed=0)
    assert good.num_samples == 2000 and good.khat < 0.5 and good.reliable
    poor = dg.diagnose(ConjugateFit(shift=0.0, scale=0.3), num_samples=2000, seed=0)
    assert poor.khat > poor.khat_threshold and poor.verdict.startswith("unreliable")
    with pytest.raises(TypeError, match="fit: expected a posterior fit with log_densities"):
        dg.diagnose(GaussianDensityFit())


def test_resample_fit_corrects_a_shifted_wide_guide():
    fit = ConjugateFit(shift=1.0, scale=1.5)
    result = dg.resample_fit(fit, 1000, seed=3)
    assert result.draws["mu"].shape == (1000,) and result.draws["theta"].shape == (1000, 2)
    assert result.diagnosis.reliable and result.diagnosis.num_samples == 4000
    tol = 4 / math.sqrt(result.diagnosis.ess)
    assert result.mean["mu"] == pytest.approx(fit.post_mean, abs=tol * fit.post_sd)
    assert result.sd["mu"] == pytest.approx(fit.post_sd, abs=tol * fit.post_sd)
    np.testing.assert_allclose(result.mean["theta"], 0.0, atol=tol)
    np.testing.assert_allclose(result.sd["theta"], 1.0, atol=tol)
    raw_error = abs(fit.sample(4000, seed=3)["mu"].mean() - fit.post_mean)
    assert abs(result.draws["mu"].mean() - fit.post_mean) < 0.5 * raw_error


def test_resample_fit_warns_on_an_unreliable_guide():
    with pytest.warns(dg.UnreliableFitWarning, match="not reliable: unreliable: k-hat"):
        result = dg.resample_fit(ConjugateFit(scale=0.3), 100, seed=0, num_proposals=1000)
    assert not result.diagnosis.reliable


def _summary_and_loo(data):
    """ArviZ's summary and loo on either line; the elpd estimate of loo."""
    az = _import_arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 0.x: a notice about rcParams defaults
        summary = az.summary(data)
        loo = az.loo(data)
    return summary, (loo.elpd_loo if dg.arviz_major_version() == 0 else loo.elpd)


def test_to_arviz_round_trip_summary_and_loo_match_closed_forms():
    fit = ConjugateFit()
    data = dg.to_arviz(fit, num_samples=2000, seed=0)
    expected_type = "InferenceData" if dg.arviz_major_version() == 0 else "DataTree"
    assert type(data).__name__ == expected_type
    post, stats = data["posterior"], data["sample_stats"]
    assert post["mu"].dims == ("chain", "draw")
    assert post["theta"].dims == ("chain", "draw", "theta_dim_0")
    assert post["theta"].shape == (1, 2000, 2)
    np.testing.assert_allclose(stats["log_weight"], stats["log_p"] - stats["log_q"])
    np.testing.assert_array_equal(data["observed_data"]["y"], fit.y)
    assert data["log_likelihood"]["y"].dims == ("chain", "draw", "y_dim_0")
    summary, elpd = _summary_and_loo(data)
    assert summary.loc["mu", "mean"] == pytest.approx(fit.post_mean, abs=0.01)
    assert list(summary.index) == ["mu", "theta[0]", "theta[1]"]
    # exact LOO: y_i | y_-i ~ N(m_-i, s_-i^2 + 1)
    precision = 1 / fit.prior_sd**2 + fit.y.size - 1
    loo_mean = (fit.y.sum() - fit.y) / precision
    exact = log_normal(fit.y, loo_mean, math.sqrt(1 / precision + 1)).sum()
    assert elpd == pytest.approx(exact, abs=0.05)


def test_to_arviz_density_fit_and_errors():
    data = dg.to_arviz(GaussianDensityFit(), num_samples=500, seed=1)
    x = np.asarray(data["posterior"]["x"])
    assert x.shape == (1, 500, 3)
    np.testing.assert_allclose(data["sample_stats"]["log_prob"], log_normal(x, 1.0, 2.0).sum(-1))
    with pytest.raises(TypeError, match="got int"):
        dg.to_arviz(3)

    class NoData(ConjugateFit):
        def observed_data(self):
            return {}

    data = dg.to_arviz(NoData(), num_samples=100, seed=0)
    groups = data.groups() if dg.arviz_major_version() == 0 else list(data.children)
    assert sorted(groups) == ["posterior", "sample_stats"]

    class WrongLikelihood(ConjugateFit):
        def log_likelihood(self, draws):
            return {"y": np.zeros((draws["mu"].shape[0], 3))}

    with pytest.raises(ValueError, match=r"site 'y': expected a log-likelihood of shape"):
        dg.to_arviz(WrongLikelihood(), num_samples=100, seed=0)


def test_to_arviz_names_dims_and_labels_them_with_coords_in_every_group():
    fit = ConjugateFit(n=5)
    obs = [f"row{i}" for i in range(5)]
    dims = {"theta": ["group"], "y": ["obs"]}
    data = dg.to_arviz(fit, 200, seed=0, coords={"group": ["a", "b"], "obs": obs}, dims=dims)
    assert data["posterior"]["theta"].dims == ("chain", "draw", "group")
    assert list(np.asarray(data["posterior"]["theta"].coords["group"])) == ["a", "b"]
    assert data["observed_data"]["y"].dims == ("obs",)
    assert data["log_likelihood"]["y"].dims == ("chain", "draw", "obs")
    assert list(np.asarray(data["log_likelihood"]["y"].coords["obs"])) == obs
    np.testing.assert_array_equal(data["observed_data"]["y"].sel(obs="row3"), fit.y[3])
    # MCMC results take the same labels
    samples = {"theta": np.arange(24.0).reshape(12, 2), "mu": np.zeros(12)}
    result = NeuTraResult(samples, np.zeros((2, 6), bool), {}, {}, num_chains=2, reparam_site="")
    posterior = result.to_arviz(coords={"group": ["a", "b"]}, dims={"theta": ["group"]})[
        "posterior"
    ]
    assert posterior["theta"].dims == ("chain", "draw", "group")
    np.testing.assert_array_equal(posterior["theta"].sel(group="b")[1], samples["theta"][6:, 1])


def test_a_neutra_result_prints_its_summary_not_its_draws():
    diverging = np.zeros((2, 500), bool)
    diverging[1, 7] = True
    samples = {"mu": np.arange(1000.0), "theta": np.arange(3000.0).reshape(1000, 3)}
    ess = {"mu": np.asarray(812.0), "theta": np.array([90.5, 400.0, 300.0])}
    r_hat = {"mu": np.asarray(1.001), "theta": np.array([1.0, 1.02, 1.0])}
    text = repr(NeuTraResult(samples, diverging, ess, r_hat, num_chains=2, reparam_site="eps"))
    assert text == (
        "NeuTraResult(2 chain(s) x 500 draws, sites ['mu', 'theta'], 1 divergences, "
        "min ESS 90.5, max R-hat 1.02)"
    )


@pytest.mark.parametrize(
    ("coords", "dims", "message"),
    [
        (
            None,
            {"tau": ["x"]},
            r"dims: no variable named 'tau'; the variables are \[.*'mu', 'theta', 'y'\]",
        ),
        (None, {"mu": ["x"]}, r"dims\['mu'\]: 1 names \['x'\] for a variable of shape \(\)"),
        (None, {"theta": "group"}, r"dims\['theta'\]: expected a list of dim names"),
        (
            {"group": ["a"]},
            {"theta": ["group"]},
            r"coords\['group'\]: 1 values, but dim 'group' "
            r"of 'theta' has size 2",
        ),  # fmt: skip
        ({"school": [1, 2]}, None, r"coords\['school'\]: no variable has a dim named 'school'"),
    ],
)
def test_to_arviz_names_a_dim_or_coord_that_does_not_fit(coords, dims, message):
    with pytest.raises((ValueError, TypeError), match=message):
        dg.to_arviz(ConjugateFit(n=5), 30, seed=0, coords=coords, dims=dims)


def test_importing_diagnostics_loads_no_arviz_torch_or_jax():
    code = (
        "import sys, flowguides.diagnostics; "
        "print(sorted(m for m in ('arviz', 'torch', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- observed sites with event dims, through the real backends ------------------------------
Y_ROWS = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, 1.0], [0.0, 0.5, 1.5], [1.0, -0.5, 2.5]])
COUNTS = np.array([3.0, 3.0, 4.0])


def _expected_log_likelihood(mu: np.ndarray) -> dict[str, np.ndarray]:
    """``rows_i ~ N(mu, I)`` per row (a ``.to_event(1)`` site) and ``counts ~ Mult(10,
    softmax(mu))`` (one value), for draws `mu` ``(S, 3)``, in numpy."""
    rows = log_normal(Y_ROWS[None], mu[:, None], 1.0).sum(-1)
    log_p = mu - np.log(np.exp(mu).sum(-1, keepdims=True))
    const = math.lgamma(COUNTS.sum() + 1) - sum(math.lgamma(c + 1) for c in COUNTS)
    return {"rows": rows, "counts": const + (COUNTS * log_p).sum(-1)}


def _check_event_dim_groups(data) -> None:
    """The log-likelihood of event-dim sites sits on the observed value's leading dims."""
    mu = np.asarray(data["posterior"]["mu"])[0]
    expected = _expected_log_likelihood(mu)
    loglik, observed = data["log_likelihood"], data["observed_data"]
    assert observed["rows"].dims == ("rows_dim_0", "rows_dim_1")
    assert loglik["rows"].dims == ("chain", "draw", "rows_dim_0")
    assert loglik["counts"].dims == ("chain", "draw")
    np.testing.assert_array_equal(observed["rows"], Y_ROWS)
    np.testing.assert_allclose(np.asarray(loglik["rows"])[0], expected["rows"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(loglik["counts"])[0], expected["counts"], rtol=1e-6)


@pytest.mark.torch
def test_to_arviz_event_dim_observations_pyro():
    import pyro
    import pyro.distributions as dist
    import torch

    from flowguides import FlowSpec
    from flowguides.pyro import fit_posterior

    def model(rows, counts):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("counts", dist.Multinomial(10, logits=mu), obs=counts)
        with pyro.plate("data", rows.shape[0]):
            pyro.sample("rows", dist.Normal(mu, 1.0).to_event(1), obs=rows)

    pyro.clear_param_store()
    spec = FlowSpec.realnvp(num_layers=1, hidden=[4])
    rows, counts = torch.tensor(Y_ROWS), torch.tensor(COUNTS)
    fit = fit_posterior(model, spec, rows, counts, num_steps=3, init_scale=0.5, progress=False)
    _check_event_dim_groups(dg.to_arviz(fit, num_samples=30, seed=0))


@pytest.mark.jax
def test_to_arviz_event_dim_observations_numpyro():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from flowguides import FlowSpec
    from flowguides.numpyro import fit_posterior

    def model(rows, counts):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        numpyro.sample("counts", dist.Multinomial(10, logits=mu), obs=counts)
        with numpyro.plate("data", rows.shape[0]):
            numpyro.sample("rows", dist.Normal(mu, 1.0).to_event(1), obs=rows)

    spec = FlowSpec.realnvp(num_layers=1, hidden=[4])
    rows, counts = jnp.asarray(Y_ROWS), jnp.asarray(COUNTS)
    fit = fit_posterior(model, spec, rows, counts, num_steps=3, init_scale=0.5, progress=False)
    _check_event_dim_groups(dg.to_arviz(fit, num_samples=30, seed=0))


def test_a_value_next_to_its_threshold_is_shown_with_the_digits_that_tell_them_apart():
    assert dg._verdict(0.6996, 0.7, False).startswith("usable: 0.5 <= k-hat 0.6996 < 0.7000")
    assert dg._verdict(0.70001, 0.7, False).startswith("unreliable: k-hat 0.70001 >= 0.70000")

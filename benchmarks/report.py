"""Turn ``benchmarks/results/*.json`` into ``docs/benchmarks.md``, plots and the README's block.

The tables (:mod:`benchmarks.tables`) print the latest row per key (:mod:`benchmarks.rows`),
its numbers or the error its method raised, with the command that reruns it; the posteriors
suite shows each accuracy figure as the median and range over seeds. The README's block comes
from :mod:`benchmarks.readme_block`.

Usage: ``python -m benchmarks.report [--readme]`` rewrites ``docs/benchmarks.md`` (and, with
``--readme``, the block of README.md between ``readme_block.BEGIN`` and ``readme_block.END``)
from the results without running anything. Imports neither torch nor JAX.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.readme_block import write_readme
from benchmarks.rows import latest
from benchmarks.tables import (
    compile_profile_section,
    densities_section,
    first_call_section,
    infer_section,
    neutra_ess_section,
    objectives_section,
    posteriors_section,
    speed_section,
)

__all__ = ["KEPT", "main", "write_docs"]

KEPT: dict[tuple[str, str], dict[str, np.ndarray]] = {}
"""Draws kept by the runner for plots: ``(problem, method) -> {site: draws}``."""

_PLOT_METHODS = ("flowguides-numpyro RealNVP", "flowguides-pyro RealNVP", "numpyro AutoIAFNormal",
                 "numpyro NUTS")  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


def _plots(img: Path) -> list[str]:
    """One PNG per problem with kept draws: reference vs methods, first two coordinates.

    A run that kept draws of only some of `_PLOT_METHODS` for a problem (an ``--only`` run)
    leaves that problem's earlier plot as it is, rather than redraw it with fewer panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks import targets

    made = []
    for prob in dict.fromkeys(p for p, _ in KEPT):
        panels = [(m, KEPT[(prob, m)]) for m in _PLOT_METHODS if (prob, m) in KEPT]
        name = f"bench-{prob}.png"
        if not panels or (len(panels) < len(_PLOT_METHODS) and (img / name).is_file()):
            continue
        from benchmarks.models import posteriordb

        if prob in targets.TARGET_NAMES:
            ref = {"z": targets.TARGETS[prob].sampler(2000, np.random.default_rng(0))}
        elif prob in posteriordb.NAMES:
            post = posteriordb.load(prob)
            ref = {k: v[::5] for k, v in post.reference.items()}
        else:  # a speed-suite problem without reference draws
            continue
        flat = {k: np.asarray(v).reshape(len(v), -1) for k, v in ref.items()}
        coords = [(k, i) for k, v in flat.items() for i in range(v.shape[1])][:2]
        if len(coords) < 2:
            continue
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.2),
                                 sharex=True, sharey=True)  # fmt: skip
        for ax, (title, draws) in zip(axes, [("reference", ref), *panels], strict=True):
            try:
                xy = [np.asarray(draws[k]).reshape(len(draws[k]), -1)[:, i] for k, i in coords]
                ax.scatter(*xy, s=2, alpha=0.3)
            except KeyError:
                pass
            ax.set_title(title, fontsize=8)
            ax.set_xlabel(f"{coords[0][0]}[{coords[0][1]}]", fontsize=8)
        axes[0].set_ylabel(f"{coords[1][0]}[{coords[1][1]}]", fontsize=8)
        fig.tight_layout()
        fig.savefig(img / name, dpi=80)
        plt.close(fig)
        made.append(name)
    return made


def write_docs(results: Path, docs: Path) -> None:
    """Write ``docs/benchmarks.md`` from every suite's JSON (and plots of the kept draws)."""
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    _plots(img)
    suites = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    parts = ["# Benchmarks\n",
             "Written by `python -m benchmarks.run` (`make bench` runs `--quick`, `make bench-full` "
             "the full plan with two rows at once (`--lanes 2`, the speed suite alone), "
             "`make bench-slow` the rows that take minutes each); the raw numbers are in "
             "`benchmarks/results/<suite>.json`, each file's meta says how many lanes its last "
             "run used. Every row has "
             "numbers or the error its method raised. Each row runs on one CPU thread "
             "(`OMP_NUM_THREADS=1`, `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false "
             "intra_op_parallelism_threads=1`, `torch.set_num_threads(1)`) in float64, at an equal "
             "step budget, particles and learning-rate schedule. In the posteriors suite every "
             "SVI anchor tries the Adam learning rates of `anchor_base.LR_GRID` and keeps the "
             "best final ELBO (the chosen rate is in *notes*; flowguides keeps its default); "
             "`AutoLaplaceApproximation` and `AutoMultivariateNormal` start at the MAP (L-BFGS, "
             "its cost in their wall time); NUTS runs 4 chains of 1,000 warm-up + 1,000 draws "
             "and reports the Monte Carlo standard error of its means (*notes*, in reference sd: "
             "the noise floor of its mean error); blackjax's multi-path Pathfinder runs Stan's "
             "defaults (4 paths, 1,000 draws each, PSIS resampling; its k-hat is the PSIS k of "
             "the pooled draws). Rows without `method_settings` predate these: every anchor at "
             "the budget's learning rate, NUTS with one chain. Each accuracy figure is the "
             "median [min – max] over the seeds listed.\n",
             "Columns: *steps/s* steady optimisation steps per second; *setup s* guide "
             "construction and initialisation before the first step (`svi.init`; for flowguides' "
             "`fit_posterior` also the `init_scale` search); *compile s* the first step (or, "
             "for `fit_posterior`, the first 100-step chunk) minus a steady one; *ELBO* the mean log weight over the evaluation draws; *k-hat* "
             "PSIS Pareto k (< 0.7 reliable); *mean err* `max_i |E_q - E_ref| / sd_ref` over every "
             "scalar; *sd ratio* range of `sd_q / sd_ref`; *test NLL* mean / median over the test points (on a "
             "set as small as iris, 38 test points, the mean is decided by one or two points far "
             "outside the training data: a flow that overfits gives them thousands of nats).\n"]  # fmt: skip
    titles = {"speed": "Speed (ELBO steps/s, compile time)", "posteriors": "Posteriors (reverse KL)",
              "densities": "Densities (forward KL: mean / median test NLL in nats per point; wall time)"}  # fmt: skip
    writers = {
        "speed": speed_section,
        "posteriors": posteriors_section,
        "densities": densities_section,
    }
    for name in ("speed", "posteriors", "densities"):
        if name not in suites:
            continue
        meta, rows = suites[name]["meta"], latest(suites[name]["rows"])
        cfg = meta["config"]
        parts.append(f"## {titles[name]}\n")
        parts.append(
            f"Latest run {meta['date']} ({'quick' if meta['quick'] else 'full'}, "
            f"{meta['suite_seconds']} s)"
            f" on {meta['cpu']} ({meta['cpu_count']} cores, load average {meta['load_average']}); "
            f"steps {cfg.get('steps')}, particles {cfg.get('particles', '–')}, evaluation draws "
            f"{cfg.get('draws', '–')}; versions {meta['versions']}. Each row's settings, versions "
            "and commit are in the results file; the tables show the latest row per key."
            + (f" {meta['rows_from_earlier_runs']} row(s) come from earlier runs (see 'ran')."
               if meta.get("rows_from_earlier_runs") else "")
            + "\n"
        )  # fmt: skip
        parts.append(writers[name](rows) + "\n")
        if name == "posteriors":
            parts.append(
                "### Objectives: ELBO / k-hat / steps per second\n\n`fit_posterior` with "
                "`FlowSpec.realnvp(num_layers=4)` in NumPyro, trained on the ELBO with the "
                "reparametrisation gradient (the default; Adam's b2 0.99, the schedule's peak "
                "held for the first quarter), the same under the earlier schedule (peak held "
                "for the first half, b2 0.999: `_EARLIER_RULE` in `benchmarks/anchors.py`), "
                'with STL (`gradient="stl"`), and on '
                'the IW-ELBO with DReG (`objective="iwelbo", num_inner=8, gradient="stl"`), '
                "at the suite's settings above; medians over the seeds (their count in "
                "brackets). The ELBO and k-hat are of the trained guide's own draws; an "
                "IW-ELBO-trained guide is wider by design, so its plain ELBO can be lower.\n"
            )
            parts.append(objectives_section(rows) + "\n")
            parts.append(
                "### `infer`: routes, accuracy and wall time against NUTS\n\n"
                "`flowguides.<backend>.infer` with `FlowSpec.realnvp(num_layers=4)` at the "
                "suite's settings: the route each seed took (`result.route`; after NUTS, its "
                "divergent transitions), the largest mean error and the range of sd ratios over "
                "the seeds (the reference's sd), the whole call's wall time (fit, diagnosis, any "
                "NUTS) as median [min – max], and NumPyro NUTS (4 chains × (1,000 + 1,000)) of "
                "the same run, with the wall-time ratio of the seed that shares its run.\n"
            )
            parts.append(infer_section(rows) + "\n")
    first_call = results / "first_call.jsonl"
    if first_call.is_file():
        lines = first_call.read_text().splitlines()
        rows = latest([json.loads(line) for line in lines if line.strip()])
        parts.append("## First call: time to first draw (NumPyro)\n")
        parts.append(
            "Written by `python -m benchmarks.first_call --all --write` (rows in "
            "`benchmarks/results/first_call.jsonl`, with their settings, versions and commit): "
            "each posterior in fresh processes (float64, one thread) sharing one persistent "
            "compilation cache. *cold*: the first process, the cache empty: `fit_posterior` "
            "with `FlowSpec.realnvp(num_layers=4)` and its defaults, then 10,000 draws; NumPyro "
            "NUTS (one chain, 1,000 + 1,000) in the same process. *warm*: the same script "
            "rerun in a new process with the cache full. Times exclude the imports and, in rows "
            "with `warm_up_s`, the process's JAX set-up (one tiny jitted operation before "
            "either method, which would otherwise fall on the first). A table per "
            "set of compiler options flowguides compiled with "
            "(`flowguides.numpyro._training.CPU_COMPILER_OPTIONS`).\n"
        )
        parts.append(first_call_section(rows) + "\n")
        profile = compile_profile_section(rows)
        if profile:
            parts.append(
                "### Programs of a first call (`--log-compiles`)\n\nEach program the fit and "
                "its draws compiled (cold) or loaded from the persistent cache (warm), from "
                "JAX's compile log (`benchmarks/compile_log.py`): seconds to trace it, lower "
                "it to StableHLO, and compile or load it.\n"
            )
            parts.append(profile + "\n")
    neutra = results / "neutra_ess.jsonl"
    if neutra.is_file():
        lines = neutra.read_text().splitlines()
        rows = latest([json.loads(line) for line in lines if line.strip()])
        parts.append("## NeuTra on the funnel: effective samples per second\n")
        parts.append(
            "Written by `python -m benchmarks.neutra_ess --write --seeds 0 1 2` (and with "
            "`--target-accept 0.9` or `0.95`: NUTS's target acceptance in both methods, shown in "
            "settings; "
            "rows in "
            "`benchmarks/results/neutra_ess.jsonl`, with their settings, versions and commit): "
            "the 10-D funnel in one process per run (float64, one thread). NUTS, and NeuTra "
            "(`fit_posterior` with `FlowSpec.realnvp(num_layers=4)` and its defaults, then "
            "`fit.neutra` at the same chains and budget), with flowMC (RQSpline + MALA) as the "
            "anchor. *wall s* counts everything (fit, compiles, warm-up, draws); *fit's KL* is "
            "the fitted guide's KL divergence to the funnel (`-fit.elbo(10000)`, log Z = 0; "
            "outside the clock); *ESS of v* is "
            "NumPyro's `effective_sample_size` over the kept draws of all chains; *ESS/s ÷ NUTS's* compares "
            "with NUTS of the same seed.\n"
        )
        parts.append(neutra_ess_section(rows) + "\n")
    pngs = sorted(p.name for p in img.glob("bench-*.png"))
    if pngs:
        parts.append("## Plots: draws against the reference (first two coordinates)\n")
        parts += [f"![{p}](img/{p})\n" for p in pngs]
    (docs / "benchmarks.md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: rewrite ``docs/benchmarks.md`` (and the README's block)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--readme", action="store_true", help="also rewrite README.md's block")
    args = parser.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    write_docs(results, ROOT / "docs")
    if args.readme:
        write_readme(results, ROOT / "README.md")


if __name__ == "__main__":
    main()

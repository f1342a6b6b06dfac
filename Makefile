# flowguides: `make demo` and `make test` set everything up from scratch in .venv.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# One thread everywhere: on small shared machines more threads only make torch and XLA slower.
export OMP_NUM_THREADS := 1
export XLA_FLAGS := --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1
export MPLBACKEND := Agg

.PHONY: install demo test lint docs bench bench-full bench-slow bench-high-dim bench-large bench-streaming bench-neutra bench-report clean

$(BIN)/flowguides: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first (pinned), so nothing below can pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[all]"
	@touch $@

install: $(BIN)/flowguides

demo: install
	$(BIN)/flowguides demo

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

docs: install
	$(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run --quick

# The full plan on two lanes (two rows at once, one thread each; the speed suite alone first).
bench-full: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run --lanes 2

# The rows that take minutes each (Pyro's infer, RNODE, zuko's CNF).
bench-slow: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run --plan slow --lanes 2

clean:
	rm -rf $(VENV) site demo-output

# High-dimensional fits (set-up, steps/s, peak memory against d), one JSON row per size.
bench-report: install
	$(BIN)/python -m benchmarks.report --readme

bench-high-dim: install
	$(BIN)/python -m benchmarks.high_dim_numpyro | tee -a benchmarks/results/high_dim_numpyro.jsonl
	$(BIN)/python -m benchmarks.high_dim_pyro | tee -a benchmarks/results/high_dim_pyro.jsonl

# Large-N posteriors: subsampled fits (with and without the control variate) against full-data NUTS.
bench-large: install
	$(BIN)/python -m benchmarks.large --problem logistic --rows 100000 1000000 --backends numpyro
	$(BIN)/python -m benchmarks.large --problem logistic --rows 100000 --backends pyro --steps 1000
	$(BIN)/python -m benchmarks.large --problem varying --rows 100000 --groups 1000 --backends numpyro
	$(BIN)/python -m benchmarks.large --problem varying --rows 1000000 --groups 10000 --backends numpyro

# Density fits streaming a memory-mapped file 4x the private memory they may use (writes ~4 GB).
bench-streaming: install
	$(BIN)/python -m benchmarks.streaming --dir $${STREAM_DIR:-/tmp/flowguides-stream}

# NeuTra against NUTS (and flowMC) on the funnel: effective samples per second on v.
bench-neutra: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.neutra_ess --write --seeds 0 1
	$(BIN)/python -m benchmarks.report --readme

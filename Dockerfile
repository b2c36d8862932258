# membank images: one Dockerfile, three targets.
#
#   docker build --target bank-server  -t membank/bank-server .   # `membank serve` (gRPC :50051)
#   docker build --target model-client -t membank/model-client .  # `membank generate/train`
#   docker build --target loadtest     -t membank/loadtest .      # locust + loadtests/
#
# Two virtualenvs: the bank server's has no torch (the project's base dependencies: it checks,
# stores and serves block bytes; ingest reads exports with a memory map), the model client's adds
# torch (CPU) and the `train` extra (membank/nn/, tokenizer, embedder, corpora). `bank-server`
# and `loadtest` run the first, `model-client` the second; docker-compose.yml uses `bank-server`
# for shards and the ingest jobs, `model-client` for the train job and `generate`, `loadtest`
# for locust. gRPC stubs are generated here, at build time (they are never committed).
# Not built in this repository's CI (no Docker engine there): see deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim

# -- venv: an empty virtualenv, the start of both builds ----------------------------------------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip
WORKDIR /src

# -- build-server: the project without torch and its generated stubs ----------------------------
FROM venv AS build-server
# dependencies before sources: this layer survives source edits
COPY pyproject.toml ./
RUN mkdir -p membank services training \
 && touch membank/__init__.py services/__init__.py training/__init__.py \
 && pip install grpcio-tools . \
 && pip uninstall -y membank
COPY proto ./proto
COPY membank ./membank
COPY membank_cli ./membank_cli
COPY services ./services
COPY training ./training
# torch is not in this venv, so the import check also proves that the server stands without it
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/membank/v1/bank.proto \
 && pip install --no-deps . \
 && pip uninstall -y grpcio-tools \
 && cd / && python -c "import membank.v1.bank_pb2_grpc, membank_cli.cli, services.bank_server.server, services.bank_server.healthcheck, services.bank_server.ingest, services.bank_server.gc"

# -- build-device: the same with torch (CPU) and the `train` extra (includes `device`) ----------
FROM venv AS build-device
# torch first, the CPU build, so that resolving the project never pulls a CUDA build: the CPU
# wheel put in deploy/wheels/ when there is one (`make compose-up` copies the one the host's
# pip installs from), else the CPU index
COPY deploy/wheels/ /wheels/
RUN if ls /wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then pip install /wheels/torch-2.13.0+cpu-*.whl; \
    else pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
COPY pyproject.toml ./
RUN mkdir -p membank services training \
 && touch membank/__init__.py services/__init__.py training/__init__.py \
 && pip install grpcio-tools '.[train]' \
 && pip uninstall -y membank
COPY proto ./proto
COPY membank ./membank
COPY membank_cli ./membank_cli
COPY services ./services
COPY training ./training
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/membank/v1/bank.proto \
 && pip install --no-deps . \
 && pip uninstall -y grpcio-tools \
 && cd / && python -c "import membank.v1.bank_pb2_grpc, services.model_client.memory_model, training.train"

# -- runtime: slim base, a non-root user, writable /data (each target brings its venv) ----------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MEMBANK_SERVER_HOST=0.0.0.0 MEMBANK_SERVER_PORT=50051 MEMBANK_SERVER_LMDB_PATH=/data/bank
# uid/gid 10001: fixed, so volumes and Kubernetes' runAsUser/fsGroup agree with the image.
# /data/run (training output), /data/bank (a shard's LMDB), /data/keys (compose's signing key
# pair, 0700) and /data/tls (compose's certificate and tokens, 0700) are created here, owned by
# the user, so that named volumes mounted there start out writable by it.
RUN groupadd --system --gid 10001 membank \
 && useradd --system --uid 10001 --gid membank --home-dir /home/membank --create-home membank \
 && mkdir -p /data/run /data/bank /data/keys /data/tls /app && chmod 0700 /data/keys /data/tls \
 && chown -R membank:membank /data /app
WORKDIR /app
USER 10001:10001

# -- bank-server: one shard (no torch) -----------------------------------------------------------
FROM runtime AS bank-server
COPY --from=build-server /opt/venv /opt/venv
# gRPC; admin HTTP (/metrics, /readyz, /v1/stats; MEMBANK_SERVER_ADMIN_PORT); the block data
# plane (raw TCP, MEMBANK_SERVER_DATAPLANE_PORT; off unless that is set)
EXPOSE 50051 8080 50052
# the probe takes host, port and TLS from the same MEMBANK_SERVER_* settings as the server
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "services.bank_server.healthcheck"]
ENTRYPOINT ["membank"]
CMD ["serve"]

# -- model-client: the device side (generate), also used for train jobs (torch) ------------------
FROM runtime AS model-client
COPY --from=build-device /opt/venv /opt/venv
ENTRYPOINT ["membank"]
CMD ["--help"]

# -- loadtest: locust master/worker with loadtests/ (gRPC clients only: no torch) ----------------
FROM runtime AS loadtest
COPY --from=build-server /opt/venv /opt/venv
USER root
RUN pip install "locust>=2.20"
COPY loadtests /app/loadtests
COPY testkit /app/testkit
USER 10001:10001
EXPOSE 8089 5557
ENTRYPOINT ["locust", "-f", "/app/loadtests/locustfile.py"]

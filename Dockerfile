# membank images: one Dockerfile, three targets that share every layer but the last.
#
#   docker build --target bank-server  -t membank/bank-server .   # `membank serve` (gRPC :50051)
#   docker build --target model-client -t membank/model-client .  # `membank generate/train/ingest`
#   docker build --target loadtest     -t membank/loadtest .      # locust + loadtests/
#
# The bank server and the model client run the same Python package (one `membank` CLI), so the
# targets differ only in their default command, exposed port and healthcheck; docker-compose.yml
# uses `bank-server` for shards and the train/ingest jobs, `loadtest` for locust.
# gRPC stubs are generated here, at build time (they are never committed).
# Not built in this repository's CI (no Docker engine there): see deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a venv with torch (CPU), the project and its generated stubs -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index, so that resolving the project never pulls a CUDA build
RUN pip install --upgrade pip \
 && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# dependencies before sources: this layer survives source edits
COPY pyproject.toml ./
RUN mkdir -p membank services training \
 && touch membank/__init__.py services/__init__.py training/__init__.py \
 && pip install grpcio-tools . \
 && pip uninstall -y membank
COPY proto ./proto
COPY membank ./membank
COPY services ./services
COPY training ./training
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/membank/v1/bank.proto \
 && pip install --no-deps . \
 && pip uninstall -y grpcio-tools \
 && cd / && python -c "import membank.v1.bank_pb2_grpc, services.bank_server.server, services.bank_server.healthcheck"

# -- runtime: slim base + the venv, a non-root user, writable /data -----------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MEMBANK_SERVER_HOST=0.0.0.0 MEMBANK_SERVER_PORT=50051 MEMBANK_SERVER_LMDB_PATH=/data/bank
COPY --from=build /opt/venv /opt/venv
# uid/gid 10001: fixed, so volumes and Kubernetes' runAsUser/fsGroup agree with the image.
# /data/run (training output) and /data/bank (a shard's LMDB) are created here, owned by the
# user, so that named volumes mounted there start out writable by it.
RUN groupadd --system --gid 10001 membank \
 && useradd --system --uid 10001 --gid membank --home-dir /home/membank --create-home membank \
 && mkdir -p /data/run /data/bank /app \
 && chown -R membank:membank /data /app
WORKDIR /app
USER 10001:10001

# -- bank-server: one shard ----------------------------------------------------------------------
FROM runtime AS bank-server
# gRPC; admin HTTP (/metrics, /readyz, /v1/stats; MEMBANK_SERVER_ADMIN_PORT); the block data
# plane (raw TCP, MEMBANK_SERVER_DATAPLANE_PORT; off unless that is set)
EXPOSE 50051 8080 50052
# the probe takes host, port and TLS from the same MEMBANK_SERVER_* settings as the server
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "services.bank_server.healthcheck"]
ENTRYPOINT ["membank"]
CMD ["serve"]

# -- model-client: the device side (generate), also used for train / ingest jobs --------------------
FROM runtime AS model-client
ENTRYPOINT ["membank"]
CMD ["--help"]

# -- loadtest: locust master/worker with loadtests/ ---------------------------------------------
FROM runtime AS loadtest
USER root
RUN pip install "locust>=2.20"
COPY loadtests /app/loadtests
USER 10001:10001
EXPOSE 8089 5557
ENTRYPOINT ["locust", "-f", "/app/loadtests/locustfile.py"]

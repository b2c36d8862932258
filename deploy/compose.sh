#!/bin/sh
# The compose stack on this machine, from nothing (`make compose-up` / `make compose-down`).
#
#   deploy/compose.sh up        Docker (docker.io, debootstrap) if missing, dockerd if none runs,
#                               base images (pulled, else deploy/local-base.sh), membank's images,
#                               the stack of docker-compose.yml, healthy, then one prompt each
#                               from the device container, the host over gRPC and the host over
#                               the data plane (TLS, tokens and signed manifests on)
#   deploy/compose.sh down      containers, networks and volumes of the stack removed, and the
#                               dockerd this script started stopped
#   deploy/compose.sh run ARGS  Compose (v2 `docker compose` or 1.29 `docker-compose`) with the
#                               project's settings, e.g. `deploy/compose.sh run ps`
#
# State lives in runs/compose/: compose.env (the image settings every later Compose call needs),
# dockerd.pid/.log, and what the host needs to reach the stack (the export, the public key, the
# certificate, the tokens), copied out of the volumes after `up`.
set -eu
cd "$(dirname "$0")/.."
STATE=runs/compose
ENV_FILE=$STATE/compose.env
PY=${PY:-.venv/bin/python}
DOCKERD_FLAGS=${MEMBANK_DOCKERD_FLAGS:---iptables=false}
mkdir -p "$STATE"

say() { echo "compose: $*"; }
die() { echo "compose: $*" >&2; exit 1; }

compose() {
    # --env-file (before the subcommand, in both versions) replaces .env once up chose images
    env=""
    [ -f "$ENV_FILE" ] && env="--env-file $ENV_FILE"
    # shellcheck disable=SC2086
    if docker compose version >/dev/null 2>&1; then docker compose $env "$@"
    else docker-compose $env "$@"; fi
}

install_tools() {
    missing=""
    command -v dockerd >/dev/null || missing="$missing docker.io"
    command -v debootstrap >/dev/null || missing="$missing debootstrap"
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
        || missing="$missing docker-compose"
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] || die "needs root to install:$missing (sudo make compose-up)"
    say "installing$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >"$STATE/apt.log" 2>&1 \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q $missing >"$STATE/apt.log" 2>&1; } \
        || die "apt-get install$missing failed: $STATE/apt.log"
}

start_dockerd() {
    docker info >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "no Docker engine runs, and starting one needs root"
    say "starting dockerd $DOCKERD_FLAGS (log: $STATE/dockerd.log)"
    # shellcheck disable=SC2086
    nohup dockerd $DOCKERD_FLAGS >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
    die "dockerd did not start in 60 s: $STATE/dockerd.log"
}

# PYTHON_IMAGE / REDIS_IMAGE: the usual ones when present or pullable, else built locally
choose_bases() {
    python=python:3.11-slim redis=redis:7-alpine
    if ! { docker image inspect $python >/dev/null 2>&1 && docker image inspect $redis >/dev/null 2>&1; } \
        && ! { timeout 60 docker pull -q $python >/dev/null 2>&1 && timeout 60 docker pull -q $redis >/dev/null 2>&1; }; then
        say "no registry: base images from Debian's packages (deploy/local-base.sh)"
        deploy/local-base.sh >/dev/null
        python=membank/python-local:3.11 redis=membank/redis-local:7
    fi
    printf 'COMPOSE_PROJECT_NAME=membank\nPYTHON_IMAGE=%s\nREDIS_IMAGE=%s\n' "$python" "$redis" \
        >"$ENV_FILE"
}

# torch's CPU wheel from wherever the host's pip finds it (its find-links), for the image
copy_torch_wheel() {
    ls deploy/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 && return 0
    links="${PIP_FIND_LINKS:-} $("$PY" -m pip config get global.find-links 2>/dev/null || true)"
    for d in $links; do
        for w in "$d"/torch-2.13.0+cpu-cp311-*.whl; do
            [ -f "$w" ] && cp "$w" deploy/wheels/ && say "torch CPU wheel from $d" && return 0
        done
    done
    say "no local torch CPU wheel: the image takes torch from the CPU index"
}

build_images() {
    . "./$ENV_FILE"
    for target in bank-server model-client loadtest; do
        say "building membank/$target:dev"
        docker build -q --network host --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" \
            --target "$target" -t "membank/$target:dev" . >"$STATE/build-$target.log" 2>&1 \
            || die "docker build --target $target failed: $STATE/build-$target.log"
    done
}

wait_healthy() {
    for _ in $(seq 150); do
        bad=""
        for s in redis shard-0 shard-1 device; do
            id=$(compose ps -q "$s" 2>/dev/null)
            [ -n "$id" ] || { bad="$bad $s(absent)"; continue; }
            h=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
            [ "$h" = healthy ] || bad="$bad $s($h)"
        done
        [ -z "$bad" ] && return 0
        sleep 2
    done
    die "not healthy after 300 s:$bad (deploy/compose.sh run logs)"
}

# the export (model), the public key, the certificate and the tokens, for clients on the host
copy_out() {
    rm -rf "$STATE/host" && mkdir -p "$STATE/host"
    docker run --rm --entrypoint sh -v membank_run:/data/run:ro -v membank_keys:/data/keys:ro \
        -v membank_tls:/data/tls:ro membank/bank-server:dev \
        -c 'cd /data && tar -c run/export keys/*.pub tls/tls.crt tls/read-token tls/admin-token' \
        | tar -x -C "$STATE/host"
}

prompt_checks() {
    h=$STATE/host
    say "a prompt from the device container (HTTP :8000 -> shards over TLS, data plane)"
    curl -sf localhost:8000/v1/generate -H 'Content-Type: application/json' \
        -d '{"prompt": "The atomic number of Tungsten is", "max_tokens": 8}' \
        | "$PY" -c 'import json, sys; r = json.load(sys.stdin); print("  ", repr(r["text"]), "memory", r["memory"], "path", r["path"]); sys.exit(0 if r["memory"] else 1)' \
        || die "the device container answered without memory"
    for bank in localhost:50051 localhost:50052+50062; do
        say "a prompt from the host, --bank $bank"
        "$PY" -m membank_cli generate "The atomic number of Tungsten is" --model "$h/run/export" \
            --bank "$bank" --trusted-keys "$h/keys" --tls-ca "$h/tls/tls.crt" \
            --token-file "$h/tls/read-token" --max-new-tokens 8 >"$STATE/generate.out" 2>&1 \
            || die "membank generate --bank $bank failed: $STATE/generate.out"
        grep -q "with memory" "$STATE/generate.out" || die "no memory: $STATE/generate.out"
        grep "with memory" "$STATE/generate.out"
    done
}

case "${1:-}" in
    up)
        t0=$(date +%s)
        install_tools
        start_dockerd
        [ -f "$ENV_FILE" ] && . "./$ENV_FILE" && docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1 \
            || choose_bases
        copy_torch_wheel
        build_images
        say "docker-compose up (train, ingest, shards, device: a few minutes the first time)"
        compose up -d --no-build >"$STATE/up.log" 2>&1 || die "compose up failed: $STATE/up.log"
        wait_healthy
        copy_out
        prompt_checks
        say "up and answering in $(( $(date +%s) - t0 )) s; host files in $STATE/host"
        ;;
    down)
        if docker info >/dev/null 2>&1; then
            compose --profile client --profile load -f docker-compose.yml \
                -f deploy/compose-shard-2.yml down -v --remove-orphans >/dev/null 2>&1 || true
            # what Compose made carries its project label: none of it may be left
            label=label=com.docker.compose.project=membank
            left="$(docker ps -aq --filter $label) $(docker network ls -q --filter $label)"
            left="$left $(docker volume ls -q --filter $label)"
            [ -z "$(echo "$left" | tr -d ' ')" ] || die "left behind after down:$left"
        fi
        if [ -f "$STATE/dockerd.pid" ]; then
            kill "$(cat "$STATE/dockerd.pid")" 2>/dev/null || true
            for _ in $(seq 30); do kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null || break; sleep 1; done
            rm -f "$STATE/dockerd.pid"
            # the containerd and shims that dockerd ran stop with it
            for _ in $(seq 10); do pgrep -f 'containerd-shim|/var/run/docker/containerd' >/dev/null || break; sleep 1; done
            pgrep -af 'containerd-shim|/var/run/docker/containerd' && die "processes left behind"
        fi
        rm -rf "$STATE/host"
        say "down: no membank containers, networks or volumes left"
        ;;
    run) shift; compose "$@" ;;
    *) echo "usage: deploy/compose.sh up|down|run ARGS" >&2; exit 2 ;;
esac

#!/bin/sh
# Base images from Debian's packages, for a Docker engine that reaches no container registry.
#
#   sudo deploy/local-base.sh                 # -> membank/python-local:3.11, membank/redis-local:7
#   PYTHON_IMAGE=membank/python-local:3.11 REDIS_IMAGE=membank/redis-local:7 docker-compose build
#
# They stand in for `python:3.11-slim` and `redis:7-alpine` (Dockerfile ARG PYTHON_IMAGE,
# docker-compose.yml ${PYTHON_IMAGE} / ${REDIS_IMAGE}); an operator who can pull those never runs
# this. Needs root (debootstrap), Debian's mirror over HTTP, and PyPI reachable from
# `docker build --network host` later. `make compose-up` runs it when the images are missing.
#
# A host behind a TLS-intercepting proxy trusts the proxy's CA in /usr/local/share/ca-certificates;
# the images trust the same certificates and point pip at the system bundle (PIP_CERT), or pip
# inside the build could not reach PyPI. On a host without such certificates nothing is added.
set -eu

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_TAG=${DEBIAN_TAG:-membank/debian-local:$SUITE}
PYTHON_TAG=${PYTHON_TAG:-membank/python-local:3.11}
REDIS_TAG=${REDIS_TAG:-membank/redis-local:7}

have() { docker image inspect "$1" >/dev/null 2>&1; }

# -- 1. a minimal Debian rootfs, imported as an image (about a minute) ---------------------------
if ! have "$DEBIAN_TAG"; then
    command -v debootstrap >/dev/null || { echo "local-base: debootstrap is not installed" >&2; exit 1; }
    root=$(mktemp -d /tmp/membank-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "local-base: debootstrap $SUITE into $root"
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >/dev/null
    # slim like debian:bookworm-slim: no docs, man pages or translations, now or from later
    # packages (dpkg skips these paths), no apt caches
    cat > "$root/etc/dpkg/dpkg.cfg.d/01-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    find "$root/usr/share/doc" -type f ! -name copyright -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' - "$DEBIAN_TAG" >/dev/null
    rm -rf "$root"
    trap - EXIT
fi

# the host's extra CA certificates (if any) go into the build context of both images
ctx=$(mktemp -d /tmp/membank-base.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/ca"
for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -e "$crt" ] && cp "$crt" "$ctx/ca/"
done

# -- 2. Python 3.11 (Debian's), like python:3.11-slim: `python` on PATH, venv, CA bundle ----------
if ! have "$PYTHON_TAG"; then
    cat > "$ctx/Dockerfile.python" <<EOF
FROM $DEBIAN_TAG
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        python3 python3-venv python-is-python3 ca-certificates \\
 && update-ca-certificates >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
    docker build --network host -q -t "$PYTHON_TAG" -f "$ctx/Dockerfile.python" "$ctx" >/dev/null
fi

# -- 3. Redis 7 (Debian's redis-server and redis-cli), like redis:7-alpine -----------------------
if ! have "$REDIS_TAG"; then
    cat > "$ctx/Dockerfile.redis" <<EOF
FROM $DEBIAN_TAG
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
USER redis
WORKDIR /var/lib/redis
EXPOSE 6379
ENTRYPOINT ["/bin/sh", "/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
EOF
    # the official image is built with protected mode off, so that a `command:` of plain
    # `redis-server --flag ...` still serves other containers; Debian's binary needs it said
    cat > "$ctx/redis-entrypoint.sh" <<'EOF'
if [ "${1:-}" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi
exec "$@"
EOF
    docker build --network host -q -t "$REDIS_TAG" -f "$ctx/Dockerfile.redis" "$ctx" >/dev/null
fi

docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
    | grep -E "^($DEBIAN_TAG|$PYTHON_TAG|$REDIS_TAG) " || true

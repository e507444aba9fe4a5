# The orchestrator binary in a small image. Two ways to build it:
#
#   docker build -t orchestrator .                      # full build (rust image)
#   docker build --target prebuilt -t orchestrator .    # a binary built outside,
#                                                       # at target/release/orchestrator
#
# `--target prebuilt` is what this repository's image test uses: no registry
# is reachable here, so `scripts/lib/images.sh` (orch_base_image_up) makes
# debian:bookworm-slim with debootstrap; the rust image cannot be had. With
# the classic builder every stage before the target is built, so `prebuilt`
# comes before the rust stage.
#
# The image runs as the unprivileged `orchestrator` user (uid 10001) and
# works with a read-only root filesystem given a writable
# /var/lib/orchestrator (a volume) and /tmp (a tmpfs):
#   docker run --rm --read-only --tmpfs /tmp -v orch-data:/var/lib/orchestrator \
#     -e ORCH_DATABASE_URL=... -e ORCH_VALKEY_URL=... orchestrator serve
# A worker that runs Docker sandboxes needs the daemon's socket mounted into
# *this* container (the sandboxes themselves never get it) and `--user 0`: it
# hands each worktree to the sandbox user (1000) and takes it back, and with
# the socket it is root-equivalent anyway. Its git data directory must be at
# the same path on the host (worktrees are bind-mounted by the host's daemon).

# Git is libgit2 inside the binary, so no git package: only TLS roots and
# OpenSSL. (Kinds with `network = "egress"` also need iptables and the host
# network on the worker; this image has neither, and such jobs fail closed.)
FROM debian:bookworm-slim AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
 && useradd --system --uid 10001 --home /var/lib/orchestrator orchestrator \
 && mkdir -p /var/lib/orchestrator && chown orchestrator /var/lib/orchestrator
COPY workers /etc/orchestrator/workers
ENV ORCH_SANDBOX__WORKERS_DIR=/etc/orchestrator/workers \
    ORCH_GIT__DATA_DIR=/var/lib/orchestrator/git \
    ORCH_HTTP_ADDR=0.0.0.0:8080 \
    ORCH_METRICS_ADDR=0.0.0.0:9464
WORKDIR /var/lib/orchestrator
VOLUME /var/lib/orchestrator
USER orchestrator
EXPOSE 8080 9464
ENTRYPOINT ["orchestrator"]
CMD ["run"]

# A binary built outside the image (stripped of its debug sections first
# saves most of its size: `strip --strip-debug`).
FROM base AS prebuilt
COPY target/release/orchestrator /usr/local/bin/orchestrator

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY config config
RUN cargo build --release --locked --bin orchestrator \
 && strip --strip-debug target/release/orchestrator

FROM base AS runtime
COPY --from=build /src/target/release/orchestrator /usr/local/bin/orchestrator

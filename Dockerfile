# The orchestrator binary in a small image. Needs a registry for its base
# images (the development machine has none; build it elsewhere):
#   docker build -t orchestrator .
#   docker run --rm -e ORCH_DATABASE_URL=... -e ORCH_VALKEY_URL=... orchestrator worker
# A worker that runs Docker sandboxes needs the daemon's socket mounted into
# *this* container (the sandboxes themselves never get it), and runs as root:
# it hands each worktree to the sandbox user (1000) and takes it back, and
# with the socket it is root-equivalent anyway. `serve` alone can run as
# the unprivileged `orchestrator` user (--user orchestrator).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY config config
RUN cargo build --release --locked --bin orchestrator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/orchestrator orchestrator \
 && mkdir -p /var/lib/orchestrator && chown orchestrator /var/lib/orchestrator
COPY --from=build /src/target/release/orchestrator /usr/local/bin/orchestrator
COPY workers /etc/orchestrator/workers
ENV ORCH_SANDBOX__WORKERS_DIR=/etc/orchestrator/workers \
    ORCH_GIT__DATA_DIR=/var/lib/orchestrator/git \
    ORCH_HTTP_ADDR=0.0.0.0:8080
WORKDIR /var/lib/orchestrator
EXPOSE 8080
ENTRYPOINT ["orchestrator"]
CMD ["run"]

#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs and starts PostgreSQL,
# Valkey and Docker (scripts/lib/services.sh), then runs every test against
# them. Extra arguments go to the test runner (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/services.sh
source scripts/lib/services.sh
# shellcheck source=lib/images.sh
source scripts/lib/images.sh
orch_services_up --with-promtool --with-browser
# The queue suite's second pass runs against a Valkey Cluster.
orch_valkey_cluster_up
if [[ "${ORCH_DOCKER_AVAILABLE:-0}" == 1 ]]; then
  orch_images_up
  # debian:bookworm-slim for the image test (tests/sandbox/image.rs).
  orch_base_image_up
else
  echo "warning: no Docker daemon; the sandbox tests will fail (see /var/log/orchestrator-dockerd.log)" >&2
fi

# The API fuzzer (tests/api/fuzz.rs).
schemathesis_version=4.32.5
if ! schemathesis --version 2>/dev/null | grep -q "$schemathesis_version"; then
  echo "installing schemathesis $schemathesis_version" >&2
  python3 -m pip install -q "schemathesis==$schemathesis_version" >&2
fi

# The supply-chain check (deny.toml). Built from crates.io once per machine.
cargo_deny_version=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$cargo_deny_version"; then
  echo "installing cargo-deny $cargo_deny_version (a few minutes, once)" >&2
  cargo install --locked --quiet cargo-deny --version "$cargo_deny_version" >&2
fi

# Databases left behind by earlier runs (each test makes its own).
psql "$ORCH_DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'test\_%'" |
  while read -r db; do psql "$ORCH_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || true; done

echo "== deployment files (deploy/: Kubernetes, compose)" >&2
scripts/check-deploy.sh

echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features apalis -- -D warnings

echo "== supply chain (deny.toml)" >&2
cargo deny --locked --all-features check bans licenses sources

echo "== tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
else
  cargo test --locked --no-fail-fast -- "$@"
fi

# The apalis backend (feature `apalis`, off by default): its example runs
# as worker and producer processes.
echo "== apalis backend (feature apalis)" >&2
cargo build --locked --features apalis --examples
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast --features apalis --test apalis "$@"
else
  cargo test --locked --no-fail-fast --features apalis --test apalis -- "$@"
fi

# The queue suite again, against a Valkey Cluster (3 primaries, 3
# replicas): ORCH_VALKEY_URL lists its nodes, and the tests that flush
# Valkey start private clusters instead of single servers.
echo "== queue suite against a Valkey Cluster ($ORCH_VALKEY_CLUSTER_URL)" >&2
export ORCH_VALKEY_URL="$ORCH_VALKEY_CLUSTER_URL" ORCH_TEST_VALKEY_CLUSTER=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast --test queue "$@"
else
  cargo test --locked --no-fail-fast --test queue -- "$@"
fi

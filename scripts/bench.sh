#!/usr/bin/env bash
# Throughput side by side in one sitting: orchestrator's own bench and the
# peers (BullMQ, graphile-worker) from ../shared/peers, alternating, on the
# same Valkey and PostgreSQL. Prints one JSON line per run.
#   ROUNDS (default 3)  N (jobs, default 20000)  PEERS_DIR (see peers/run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/services.sh
source scripts/lib/services.sh
orch_services_up --no-docker
cargo build --release --locked --quiet
bin=target/release/orchestrator
"$bin" migrate 2>/dev/null
peers=${PEERS_SCRIPT:-../shared/peers/run.sh}
peers_db=${PEERS_DATABASE_URL:-$(python3 -c 'import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path="/orchestrator_peers").geturl())' "$ORCH_DATABASE_URL")}
psql "$ORCH_DATABASE_URL" -qtc "SELECT 1 FROM pg_database WHERE datname = 'orchestrator_peers'" | grep -q 1 ||
  psql "$ORCH_DATABASE_URL" -qc "CREATE DATABASE orchestrator_peers"
port=${ORCH_VALKEY_URL##*:}
for round in $(seq 1 "${ROUNDS:-3}"); do
  echo "== round $round" >&2
  ORCH_LOG=warn "$bin" bench queue --jobs "${N:-20000}" --concurrency 50 --prefetch 500 | tail -n 1
  if [ -x "$peers" ]; then
    N=${N:-20000} VALKEY_PORT=$port DATABASE_URL=$peers_db "$peers"
  fi
done

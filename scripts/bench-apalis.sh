#!/usr/bin/env bash
# One apalis 1.0 worker, no-op tasks, side by side in one sitting: on
# orchestrator (examples/apalis_bench.rs, feature `apalis`) and on
# apalis-redis (../shared/peers/rust/apalis-redis-bench), alternating.
# Prints each run's line, then one JSON summary with the ratio of the
# medians of "worker exit" throughput (every ack flushed, on both sides).
#   ROUNDS (default 3)  N (tasks, default 20000)  CONC (default 50)
#   PEERS_DIR (where the peer is built, default /tmp/orchestrator-peers)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/services.sh
source scripts/lib/services.sh
orch_services_up --no-docker

n=${N:-20000}
conc=${CONC:-50}
rounds=${ROUNDS:-3}
peer_src=${APALIS_PEER_SRC:-../shared/peers/rust/apalis-redis-bench}
peer_dir=${PEERS_DIR:-/tmp/orchestrator-peers}/apalis-redis-bench

echo "== building (release): the apalis bench on orchestrator, and the apalis-redis peer" >&2
cargo build --release --locked --quiet --features apalis --example apalis_bench
ours=target/release/examples/apalis_bench
mkdir -p "$peer_dir"
cp -r "$peer_src/Cargo.toml" "$peer_src/Cargo.lock" "$peer_src/src" "$peer_dir/"
(cd "$peer_dir" && cargo build --release --locked --quiet)
peer=$peer_dir/target/release/apalis-redis-bench

# The peer flushes its Valkey at start: it gets a private one.
peer_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
peer_data=$(mktemp -d)
"$ORCH_VALKEY_SERVER" --port "$peer_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$peer_data" --daemonize yes --pidfile "$peer_data/valkey.pid" >/dev/null
trap 'kill "$(cat "$peer_data/valkey.pid")" 2>/dev/null || true; rm -rf "$peer_data"' EXIT
orch_wait_tcp 127.0.0.1 "$peer_port" 10

ours_rates=()
peer_rates=()
for round in $(seq 1 "$rounds"); do
  echo "== round $round" >&2
  line=$(N=$n CONC=$conc ORCH_LOG=warn "$ours")
  echo "$line"
  ours_rates+=("$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["process_per_s"])' "$line")")
  out=$(REDIS_URL="redis://127.0.0.1:$peer_port" N=$n CONC=$conc "$peer")
  echo "$out" | sed 's/^/apalis-redis: /'
  # "... worker exit (acks flushed) 4.321s = 4628 jobs/s"
  rate=$(echo "$out" | sed -n 's/.*worker exit (acks flushed) [0-9.]*s = \([0-9.]*\) jobs\/s.*/\1/p')
  verify=$(echo "$out" | sed -n 's/^verify: done set=\([0-9]*\) .*/\1/p')
  if [ -z "$rate" ] || [ "$verify" != "$n" ]; then
    echo "the peer's run did not finish its $n tasks: $out" >&2
    exit 1
  fi
  peer_rates+=("$rate")
done

python3 - "$n" "$conc" "${ours_rates[*]}" "${peer_rates[*]}" <<'EOF'
import json, statistics, sys
n, conc, ours, peer = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
ours = [float(x) for x in ours]
peer = [float(x) for x in peer]
print(json.dumps({
    "bench": "apalis worker, no-op tasks",
    "jobs": int(n),
    "concurrency": int(conc),
    "orchestrator_per_s": ours,
    "apalis_redis_per_s": peer,
    "median_ratio": round(statistics.median(ours) / statistics.median(peer), 2),
}))
EOF

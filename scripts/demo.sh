#!/usr/bin/env bash
# The main job end to end on a fresh machine: installs and starts PostgreSQL
# and Valkey, builds orchestrator, applies migrations, runs `orchestrator run`
# (API + workers + maintenance), sends sample jobs through it and shows what
# happened to them.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/services.sh
source scripts/lib/services.sh
# shellcheck source=lib/images.sh
source scripts/lib/images.sh
orch_services_up
if [[ "${ORCH_DOCKER_AVAILABLE:-0}" == 1 ]]; then
  orch_images_up
else
  # Isolation fails closed: without Docker the demo must choose local
  # processes explicitly (and every job result names the runtime).
  echo "note: no Docker daemon; the demo chooses sandbox.runtime = local (agents as host processes, weaker isolation)" >&2
  export ORCH_SANDBOX__RUNTIME=local
fi

echo "== building" >&2
cargo build --locked --quiet
bin=target/debug/orchestrator

mkdir -p .data
export ORCH_HTTP_ADDR="${ORCH_HTTP_ADDR:-127.0.0.1:8080}"
host=${ORCH_HTTP_ADDR%:*}
port=${ORCH_HTTP_ADDR##*:}
if orch_wait_tcp "$host" "$port" 0 2>/dev/null; then
  echo "error: something already listens on $ORCH_HTTP_ADDR; set ORCH_HTTP_ADDR to a free address" >&2
  exit 1
fi

"$bin" migrate
# The sample repository: a bare "remote" on this machine, so allow local repos.
export ORCH_GIT_ALLOW_LOCAL=true
demo_repo="$PWD/.data/demo/origin.git"
if [[ ! -d "$demo_repo" ]]; then
  rm -rf .data/demo && mkdir -p .data/demo
  git init -q --bare -b main "$demo_repo"
  git clone -q "$demo_repo" .data/demo/seed 2>/dev/null
  printf '# sample\n\nA repository for the orchestrator demo.\n' > .data/demo/seed/README.md
  git -C .data/demo/seed -c user.name=demo -c user.email=demo@localhost add README.md
  git -C .data/demo/seed -c user.name=demo -c user.email=demo@localhost commit -q -m "initial commit"
  git -C .data/demo/seed push -q origin HEAD:main
fi
# A token for this demo's API calls (every scope); never logged.
export ORCH_ADMIN_TOKEN="${ORCH_ADMIN_TOKEN:-demo-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}"
echo "== starting orchestrator run (log: .data/demo.log)" >&2
"$bin" run --concurrency 8 >.data/demo.log 2>&1 &
run_pid=$!
trap 'kill -TERM $run_pid 2>/dev/null; wait $run_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://$ORCH_HTTP_ADDR/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://$ORCH_HTTP_ADDR/readyz"
echo

summary() {
  python3 -c "import json,sys; j=json.load(sys.stdin); print('  %-6s %s  %-9s attempt %s/%s  result=%s' % (j['kind'], j['id'], j['status'], j['attempt'], j['max_attempts'], json.dumps(j['result'])))"
}

echo "== sample jobs" >&2
"$bin" enqueue noop --wait | summary
"$bin" enqueue sleep --payload '{"ms": 500}' --priority 9 --wait | summary
flaky=$("$bin" enqueue flaky --payload '{"fail_times": 2}' --max-attempts 5 --wait)
echo "$flaky" | summary
flaky_id=$(echo "$flaky" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

echo "== audit trail of the flaky job (failed twice, retried with backoff, then succeeded)" >&2
"$bin" jobs show "$flaky_id" | python3 -c "
import json, sys
for e in json.load(sys.stdin)['events']:
    print('  %s  %-10s by %-28s %s' % (e['at'], e['type'], e['actor'], json.dumps(e['data'])))"

echo "== the HTTP API: enqueue with an idempotency key, then follow the job's events live (SSE)" >&2
auth="Authorization: Bearer $ORCH_ADMIN_TOKEN"
api_job=$(curl -fsS -X POST "http://$ORCH_HTTP_ADDR/v1/jobs" -H "$auth" -H 'Content-Type: application/json' \
  -H 'Idempotency-Key: demo-sleep-1' -d '{"kind": "sleep", "payload": {"ms": 300}, "priority": 7}')
api_id=$(echo "$api_job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "  POST /v1/jobs -> $api_id"
curl -fsSN "http://$ORCH_HTTP_ADDR/v1/jobs/$api_id/events" -H "$auth" -H 'Accept: text/event-stream' | grep '^event:' | sed 's/^/  /'
curl -sS -o /dev/null -w "  a bad request answers %{http_code} with application/problem+json: " -X POST "http://$ORCH_HTTP_ADDR/v1/jobs" -H "$auth" -H 'Content-Type: application/json' -d '{"kind": "noop", "priority": 11}'
curl -sS -X POST "http://$ORCH_HTTP_ADDR/v1/jobs" -H "$auth" -H 'Content-Type: application/json' -d '{"kind": "noop", "priority": 11}'
echo

echo "== an agent job: script-agent on the sample repository, through spawn, git and complete" >&2
agent=$(curl -fsS -X POST "http://$ORCH_HTTP_ADDR/v1/jobs" -H "$auth" -H 'Content-Type: application/json' -d "$(python3 -c '
import json, sys
print(json.dumps({"kind": "script-agent", "payload": {
    "repo": sys.argv[1], "base": "main", "push": True,
    "script": "echo \"Written by the agent of job $ORCH_JOB_ID\" > AGENT.md && ls -la"}}))' "$demo_repo")")
agent_id=$(echo "$agent" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -fsSN "http://$ORCH_HTTP_ADDR/v1/jobs/$agent_id/events" -H "$auth" -H 'Accept: text/event-stream' |
  python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("data: "):
        e = json.loads(line[6:])
        d = e["data"]
        detail = d.get("line") or d.get("stage") or ""
        if e["type"] == "stage_finished":
            detail = "%s %sms ok=%s" % (d["stage"], d["duration_ms"], d["ok"])
        print("  %-15s %s" % (e["type"], detail))'
curl -fsS "http://$ORCH_HTTP_ADDR/v1/jobs/$agent_id" -H "$auth" | python3 -c '
import json, sys
j = json.load(sys.stdin)
r = j.get("result") or {}
print("  status=%s commit=%s branch=%s pushed=%s" % (j["status"], r.get("commit"), r.get("branch"), r.get("pushed")))
if j["status"] != "succeeded": print("  last_error:", j.get("last_error"))'
echo "  the remote now has:"
git --git-dir="$demo_repo" log --oneline --all | sed 's/^/    /'

echo "== the kill switch: an agent that would run for ten minutes, stopped with everything else" >&2
stuck=$(curl -fsS -X POST "http://$ORCH_HTTP_ADDR/v1/jobs" -H "$auth" -H 'Content-Type: application/json' \
  -d '{"kind": "script-agent", "payload": {"script": "echo working; sleep 600"}}')
stuck_id=$(echo "$stuck" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 1 300); do
  status=$(curl -fsS "http://$ORCH_HTTP_ADDR/v1/jobs/$stuck_id" -H "$auth" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [[ "$status" == running ]] && break
  sleep 0.1
done
curl -fsS -X POST "http://$ORCH_HTTP_ADDR/v1/killswitch" -H "$auth" -H 'Content-Type: application/json' \
  -d '{"reason": "demo: stop everything"}' | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("  POST /v1/killswitch: engaged=%s by %s; cancelled=%s failed=%s; queues paused: %s" % (
    r["engaged"], r["actor"], r["cancelled"], r["failed"], ", ".join(r["queues_paused"])))'
curl -fsS "http://$ORCH_HTTP_ADDR/v1/killswitch" -H "$auth" | sed 's/^/  GET \/v1\/killswitch: /'
echo
curl -fsS -X DELETE "http://$ORCH_HTTP_ADDR/v1/killswitch?reason=demo%20over" -H "$auth" >/dev/null
echo "  DELETE /v1/killswitch: lifted"
sleep 0.5
curl -fsS "http://$ORCH_HTTP_ADDR/v1/jobs/$stuck_id/events" -H "$auth" | python3 -c '
import json, sys
e = json.load(sys.stdin)["events"][-1]
print("  the agent job: %s, requested_by=%s, reason=%r, in stage %s" % (
    e["type"], e["data"].get("requested_by"), e["data"].get("reason"), e["data"].get("stage")))'

echo "== queues" >&2
"$bin" queues
echo "== metrics (excerpt of http://$ORCH_HTTP_ADDR/metrics)" >&2
curl -fsS "http://$ORCH_HTTP_ADDR/metrics" | grep -E '^orchestrator_jobs_(enqueued|finished)_total' || true

echo "== the dashboard (http://$ORCH_HTTP_ADDR/ui/): log in with the token, open the agent's job" >&2
jar="$(mktemp)"
curl -fsS -c "$jar" -o /dev/null --data-urlencode "token=$ORCH_ADMIN_TOKEN" "http://$ORCH_HTTP_ADDR/ui/login"
curl -fsS -b "$jar" "http://$ORCH_HTTP_ADDR/ui/jobs/$agent_id" |
  python3 -c 'import re,sys; page=sys.stdin.read(); m=re.search(r"class=\"status status-(\w+)\"", page); print("  the agent job on its page:", m.group(1) if m else "no status shown"); sys.exit(0 if m else 1)'
rm -f "$jar"

cat >&2 <<TXT

Done. Where to look:
  target/debug/orchestrator jobs list          recent jobs
  target/debug/orchestrator jobs show <id>     one job and its audit trail
  .data/demo.log                               the server's log
  http://$ORCH_HTTP_ADDR/ui/                    the dashboard (log in with \$ORCH_ADMIN_TOKEN)
  http://$ORCH_HTTP_ADDR/v1/openapi.json        the API, described
  git --git-dir=$demo_repo log --all --stat   the agent's pushed branch
Start it yourself with: ORCH_ADMIN_TOKEN=<16+ chars> target/debug/orchestrator run   (API on $ORCH_HTTP_ADDR)
TXT

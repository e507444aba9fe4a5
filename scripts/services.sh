#!/usr/bin/env bash
# scripts/services.sh -- install and start PostgreSQL, Valkey and (best effort)
# Docker for orchestrator, then print `export` lines for their settings:
#
#     eval "$(scripts/services.sh)"
#
# Options:
#   --no-docker       do not install/start Docker (ORCH_DOCKER_AVAILABLE not set)
#   --with-promtool   also install promtool (Debian's prometheus package)
#   --with-browser    also install chromium and chromium-driver (dashboard tests)
#   -h, --help        this text
#
# Messages go to stderr; stdout carries only the export lines. On failure it
# exits non-zero and prints `false` on stdout, so `eval "$(...)"` fails too.
# Idempotent: when everything is already up, a run takes about a second.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

args=()
for arg in "$@"; do
    case "$arg" in
        --no-docker | --with-promtool | --with-browser) args+=("$arg") ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
            exit 0
            ;;
        *)
            echo "services.sh: unknown option: $arg (see --help)" >&2
            echo false
            exit 2
            ;;
    esac
done

# Everything but the final export lines goes to stderr.
exec 3>&1 1>&2

# shellcheck source=lib/services.sh
source "$here/lib/services.sh"

start_ns=$(date +%s%N)
if ! orch_services_up "${args[@]}"; then
    echo "[services] FAILED: see the messages above" >&2
    echo false >&3
    exit 1
fi

for var in ORCH_DATABASE_URL ORCH_VALKEY_URL ORCH_VALKEY_SERVER ORCH_DOCKER_AVAILABLE ORCH_PROMTOOL ORCH_CHROMIUM ORCH_CHROMEDRIVER; do
    if [[ -n "${!var:-}" ]]; then
        printf 'export %s=%q\n' "$var" "${!var}" >&3
    fi
done
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
printf '[services] all up in %d.%03ds\n' $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) >&2

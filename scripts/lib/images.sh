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

# orch_base_image_up: makes debian:bookworm-slim locally (no registry is
# reachable): `debootstrap --variant=minbase bookworm` plus `docker import`.
# Once per machine; the Dockerfile's runtime stages start FROM it.
orch_base_image_up() {
    local image=debian:bookworm-slim
    if docker image inspect "$image" >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        _orch_apt_install debootstrap || return 1
    fi
    local mirror="${ORCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}" root
    root="$(mktemp -d /tmp/orch-bookworm.XXXXXX)"
    printf '[images] debootstrap --variant=minbase bookworm (a few minutes, once)\n' >&2
    if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >/tmp/orch-debootstrap.log 2>&1; then
        printf '[images] ERROR: debootstrap failed (see /tmp/orch-debootstrap.log)\n' >&2
        rm -rf "$root"
        return 1
    fi
    # What makes it slim: no package lists, caches, documentation or
    # translations, now and (by dpkg's path excludes) for later installs.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/*
    cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
SLIM
    if ! tar -C "$root" -c . | docker import - "$image" >/dev/null; then
        printf '[images] ERROR: docker import of %s failed\n' "$image" >&2
        rm -rf "$root"
        return 1
    fi
    rm -rf "$root"
    printf '[images] %s ready\n' "$image" >&2
}

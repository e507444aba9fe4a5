#!/usr/bin/env bash
# Offline checks of deploy/ (the Kubernetes manifests, the compose file and
# its Prometheus config): see scripts/check_deploy.py. Installs what it
# needs (kubernetes-validate from PyPI, Debian's docker-compose and
# prometheus) and proves each check can fail (--self-test). scripts/test.sh
# runs it; no Kubernetes cluster is needed or used.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=lib/services.sh
source scripts/lib/services.sh

kubernetes_validate_version=1.37.0
if ! python3 -m pip show kubernetes-validate 2>/dev/null | grep -qx "Version: $kubernetes_validate_version"; then
  echo "installing kubernetes-validate $kubernetes_validate_version" >&2
  python3 -m pip install -q "kubernetes-validate==$kubernetes_validate_version" >&2
fi
command -v docker-compose >/dev/null || _orch_apt_install docker-compose
orch_promtool_up

# The compose stack's Prometheus reads alerts.yml from beside its config, as
# the container mounts them.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp deploy/compose/prometheus.yml deploy/prometheus/alerts.yml "$tmp/"
"$ORCH_PROMTOOL" check config "$tmp/prometheus.yml" >&2

python3 scripts/check_deploy.py --self-test

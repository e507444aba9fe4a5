"""Offline checks of the deployment files in deploy/ (run by check-deploy.sh).

There is no Kubernetes cluster on the development machine, so this is what
stands in for `kubectl apply --dry-run=server`:

- every Kubernetes manifest under deploy/k8s is validated, strictly (unknown
  fields are errors), against the API schemas of KUBERNETES_VERSION
  (kubernetes-validate) or, for KEDA's and prometheus-operator's resources,
  against the CRD schemas vendored in deploy/k8s/schemas;
- each kustomization's resources exist, every manifest belongs to one, and
  no overlay defines one object twice or refers to a ConfigMap, Secret,
  TriggerAuthentication or scale target it does not define;
- the manifests agree with the orchestrator's own configuration: the config
  file's keys exist, pods stop later than the worker's shutdown grace plus
  the kinds' stop grace, a preStop hook stops claiming, and KEDA's queries
  count the queues the workers claim from, one pod per worker.concurrency;
- deploy/compose.yaml passes `docker-compose config`, its services have
  health checks and its workers a long enough stop_grace_period.

With --self-test it also breaks a copy of deploy/ in each of those ways and
fails unless every break is caught.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

# The oldest Kubernetes the manifests are for (KEDA 2.20 supports 1.32+).
KUBERNETES_VERSION = "1.32.0"

REPO = Path(__file__).resolve().parent.parent

CRD_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda/keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "ScaledJob"): "keda/keda.sh_scaledjobs.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda/keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
}


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")


def strict(schema: object) -> object:
    """A CRD schema that refuses unknown fields, as the API server's strict
    field validation does: objects with `properties` get
    additionalProperties false unless they preserve unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validators(deploy: Path) -> dict:
    validators = {}
    for (api_version, kind), rel in CRD_FILES.items():
        crd = yaml.safe_load((deploy / "k8s" / "schemas" / rel).read_text())
        version = api_version.split("/")[1]
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])
        # Every object has these; the CRD schema leaves metadata open.
        schema.setdefault("properties", {})
        schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
        schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
        validators[(api_version, kind)] = jsonschema.Draft7Validator(strict(schema))
    return validators


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def validate_manifests(deploy: Path, problems: Problems) -> dict[Path, list[dict]]:
    """Every manifest file under deploy/k8s (not schemas/, not the
    kustomizations), validated; returns the objects by file."""
    validators = crd_validators(deploy)
    k8s = deploy / "k8s"
    objects: dict[Path, list[dict]] = {}
    for name in sorted(glob.glob(str(k8s / "**" / "*.yaml"), recursive=True)):
        path = Path(name)
        rel = path.relative_to(k8s)
        if rel.parts[0] == "schemas" or path.name == "kustomization.yaml":
            continue
        docs = load_docs(path)
        objects[path] = docs
        for doc in docs:
            where = f"{rel} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            if doc.get("kind") != "Namespace" and doc.get("metadata", {}).get("namespace") != "orchestrator":
                problems.add(where, "every object belongs in the orchestrator namespace")
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in validators:
                for error in validators[key].iter_errors(doc):
                    path_s = "/".join(str(p) for p in error.absolute_path)
                    problems.add(where, f"{path_s}: {error.message}")
            else:
                try:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as error:
                    path_s = "/".join(str(p) for p in error.path)
                    problems.add(where, f"{path_s}: {error.message}")
                except kubernetes_validate.SchemaNotFoundError as error:
                    problems.add(where, f"no schema: {error.message}")
    return objects


def overlay(k8s: Path, directory: Path, problems: Problems, seen: set[Path]) -> list[tuple[Path, dict]]:
    """The objects a kustomization builds (resources only: no patches or
    generators are used here), with the files they come from."""
    kfile = directory / "kustomization.yaml"
    if not kfile.exists():
        problems.add(str(directory.relative_to(k8s)), "no kustomization.yaml")
        return []
    kust = yaml.safe_load(kfile.read_text())
    extra = set(kust) - {"apiVersion", "kind", "resources"}
    if extra:
        problems.add(str(kfile.relative_to(k8s)), f"only resources are checked here, not {sorted(extra)}")
    out = []
    for res in kust.get("resources", []):
        target = (directory / res).resolve()
        if target.is_dir():
            out += overlay(k8s, target, problems, seen)
        elif target.is_file():
            if target.parent != directory.resolve():
                # kustomize's load restrictor refuses files outside the root.
                problems.add(str(kfile.relative_to(k8s)), f"{res}: a file outside this directory")
            seen.add(target)
            out += [(target, d) for d in load_docs(target)]
        else:
            problems.add(str(kfile.relative_to(k8s)), f"{res}: no such file or directory")
    return out


def pod_specs(doc: dict) -> list[dict]:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "ScaledJob":
        return [doc["spec"]["jobTargetRef"]["template"]["spec"]]
    return []


def config_keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in table.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= config_keys(v, prefix + k + ".")
    return keys


def max_stop_grace(repo: Path) -> int:
    graces = [0]
    for name in glob.glob(str(repo / "workers" / "*" / "worker.toml")):
        kind = tomllib.loads(Path(name).read_text())
        graces.append(int(kind.get("stop_grace_secs", 0)))
    return max(graces)


def queues_in(query: str) -> list[str] | None:
    m = re.search(r"queue = ANY \('\{([^}]*)\}'\)", query)
    return [q.strip() for q in m.group(1).split(",")] if m else None


def check_overlay(name: str, objects: list[tuple[Path, dict]], repo: Path, k8s: Path, problems: Problems) -> None:
    where = f"overlay {name}"
    by_id: dict[tuple, Path] = {}
    for path, doc in objects:
        ident = (doc.get("kind"), doc.get("metadata", {}).get("name"))
        if ident in by_id:
            problems.add(where, f"{ident[0]}/{ident[1]} twice ({by_id[ident].relative_to(k8s)}, {path.relative_to(k8s)})")
        by_id[ident] = path
    names = {(k, n) for (k, n) in by_id}

    configmaps = [d for _, d in objects if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "orchestrator-config"]
    if len(configmaps) != 1:
        problems.add(where, "needs the orchestrator-config ConfigMap")
        return
    try:
        config = tomllib.loads(configmaps[0]["data"]["config.toml"])
    except tomllib.TOMLDecodeError as error:
        problems.add(where, f"config.toml: {error}")
        return
    defaults = tomllib.loads((repo / "config" / "default.toml").read_text())
    unknown = config_keys(config) - config_keys(defaults)
    # Tables of free-form names (queue limits, token hosts, context windows).
    open_tables = ("admission.queue_limits.", "admission.max_per_key.", "admission.context_windows.", "git.host_tokens.")
    unknown = {k for k in unknown if not k.startswith(open_tables)}
    if unknown:
        problems.add(where, f"config.toml: keys the orchestrator refuses: {sorted(unknown)}")
    worker = {**defaults["worker"], **config.get("worker", {})}
    grace_needed = int(worker["shutdown_grace_secs"]) + max_stop_grace(repo)
    queues = list(worker["queues"])

    workers = 0
    for path, doc in objects:
        kind, obj = doc.get("kind"), doc["metadata"]["name"]
        at = f"{path.relative_to(k8s)} {kind}/{obj}"
        for spec in pod_specs(doc):
            for volume in spec.get("volumes", []):
                cm = volume.get("configMap", {}).get("name")
                if cm and ("ConfigMap", cm) not in names:
                    problems.add(at, f"volume {volume['name']}: no ConfigMap {cm} in {name}")
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ("Secret", ref["name"]) not in names:
                        problems.add(at, f"{env['name']}: no Secret {ref['name']} in {name}")
            for container in spec.get("containers", []):
                if container.get("args", [None])[0] != "worker" or "--maintenance-only" in container.get("args", []):
                    continue
                workers += 1
                grace = spec.get("terminationGracePeriodSeconds", 30)
                if grace <= grace_needed:
                    problems.add(
                        at,
                        f"terminationGracePeriodSeconds {grace} must exceed shutdown_grace_secs plus the "
                        f"largest stop_grace_secs ({grace_needed})",
                    )
                command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                if "kill -TERM 1" not in " ".join(command):
                    problems.add(at, "a worker needs a preStop hook that stops claiming (kill -TERM 1)")
        if kind in ("ScaledObject", "ScaledJob"):
            target = doc["spec"].get("scaleTargetRef", {}).get("name")
            if kind == "ScaledObject" and ("Deployment", target) not in names:
                problems.add(at, f"scales Deployment {target}, which {name} does not define")
            triggers = doc["spec"]["triggers"]
            if any(t["type"] == "redis" for t in triggers) and not any(t["type"] != "redis" for t in triggers):
                problems.add(at, "a redis trigger alone counts pending jobs only and scales down running agents")
            for trigger in triggers:
                auth = trigger.get("authenticationRef", {}).get("name")
                if auth and ("TriggerAuthentication", auth) not in names:
                    problems.add(at, f"no TriggerAuthentication {auth} in {name}")
                if trigger["type"] != "postgresql":
                    continue
                query = trigger["metadata"]["query"]
                if queues_in(query) != queues:
                    problems.add(at, f"the query counts queues {queues_in(query)}, the workers claim {queues}")
                if "status = 'running'" not in query:
                    problems.add(at, "the query must count running jobs too, or KEDA scales down running agents")
                per_pod = 1 if kind == "ScaledJob" else int(worker["concurrency"])
                if trigger["metadata"].get("targetQueryValue") != str(per_pod):
                    problems.add(at, f"targetQueryValue must be {per_pod} (jobs one pod runs)")
    if workers == 0:
        problems.add(where, "runs no worker")


def check_kustomize(deploy: Path, repo: Path, objects: dict[Path, list[dict]], problems: Problems) -> None:
    k8s = deploy / "k8s"
    seen: set[Path] = set()
    for name in (".", "scaledjob"):
        built = overlay(k8s, (k8s / name).resolve(), problems, seen)
        check_overlay(name, built, repo, k8s, problems)
    for path in objects:
        if path.resolve() not in seen:
            problems.add(str(path.relative_to(k8s)), "not in any kustomization")


def check_compose(deploy: Path, repo: Path, problems: Problems) -> None:
    compose = deploy / "compose.yaml"
    checked = subprocess.run(
        ["docker-compose", "-f", str(compose), "config"], capture_output=True, text=True
    )
    if checked.returncode != 0:
        problems.add("compose.yaml", f"docker-compose config: {checked.stderr.strip()}")
        return
    config = yaml.safe_load(checked.stdout)
    defaults = tomllib.loads((repo / "config" / "default.toml").read_text())
    for name, service in config["services"].items():
        command = service.get("command") or []
        one_shot = service.get("restart") == "no"
        if not one_shot and "healthcheck" not in service:
            problems.add(f"compose.yaml {name}", "needs a healthcheck")
        if command[:1] == ["worker"]:
            env = service.get("environment", {})
            shutdown = int(env.get("ORCH_WORKER__SHUTDOWN_GRACE_SECS", defaults["worker"]["shutdown_grace_secs"]))
            needed = shutdown + max_stop_grace(repo)
            grace = service.get("stop_grace_period", "10s")
            m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", grace)
            secs = int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m else 0
            if secs <= needed:
                problems.add(f"compose.yaml {name}", f"stop_grace_period {grace} must exceed {needed}s")
    workers = [n for n, s in config["services"].items() if (s.get("command") or [])[:1] == ["worker"]]
    if len(workers) < 2:
        problems.add("compose.yaml", f"two workers expected, found {workers}")


def check(deploy: Path, repo: Path) -> list[str]:
    problems = Problems()
    objects = validate_manifests(deploy, problems)
    check_kustomize(deploy, repo, objects, problems)
    check_compose(deploy, repo, problems)
    return problems.items


# Each break of a copy of deploy/ and what the check must then say.
BREAKS = [
    ("k8s/worker.yaml", "terminationGracePeriodSeconds: 90", "terminationGracePeriodSeconds: 45", "must exceed"),
    ("k8s/worker.yaml", 'command: ["/bin/sh", "-c", "kill -TERM 1"]', 'command: ["/bin/sh", "-c", "true"]', "preStop"),
    ("k8s/worker.yaml", "  revisionHistoryLimit: 5\n", "  revisionHistoryLimit: 5\n  replica: 3\n", "Additional properties"),
    ("k8s/worker-scaledobject.yaml", "pollingInterval: 15", "pollingInterval: often", "is not of type"),
    ("k8s/worker-scaledobject.yaml", 'targetQueryValue: "4"', 'targetQueryValue: "16"', "targetQueryValue must be 4"),
    ("k8s/worker-scaledobject.yaml", "ANY ('{default}')", "ANY ('{default,agents}')", "counts queues"),
    ("k8s/worker-scaledobject.yaml", "AND (status = 'running' OR run_at <= now())", "AND run_at <= now()", "running jobs too"),
    ("k8s/scaledjob/worker-scaledjob.yaml", "backoffLimit: 0", "backoffLimits: 0", "Additional properties"),
    ("k8s/base/api.yaml", "containerPort: 8080", "containerPort: http", "is not of type"),
    ("k8s/base/configmap.yaml", "shutdown_grace_secs = 30", "shutdown_grace_secs = 30\n    shutdown_grace = 30", "refuses"),
    ("k8s/base/configmap.yaml", "shutdown_grace_secs = 30", "shutdown_grace_secs = 75", "must exceed"),
    ("k8s/base/kustomization.yaml", "  - keda-auth.yaml\n", "", "not in any kustomization"),
    ("k8s/kustomization.yaml", "  - worker.yaml\n", "  - worker.yaml\n  - worker.yaml\n", "twice"),
    ("compose.yaml", "stop_grace_period: 90s", "stop_grace_period: 40s", "stop_grace_period 40s"),
    ("compose.yaml", '      start_period: 10s\n    stop_grace_period: 30s\n', '      start_period: 10s\n    stop_grace_period: [30s\n', "docker-compose config"),
]


def self_test(repo: Path) -> list[str]:
    failures = []
    for rel, old, new, expected in BREAKS:
        with tempfile.TemporaryDirectory() as tmp:
            copy_root = Path(tmp) / "repo"
            copy_root.mkdir()
            shutil.copytree(repo / "deploy", copy_root / "deploy")
            shutil.copytree(repo / "config", copy_root / "config")
            shutil.copytree(repo / "workers", copy_root / "workers")
            # compose.yaml builds from .. : give it the file it names.
            shutil.copy(repo / "Dockerfile", copy_root / "Dockerfile")
            target = copy_root / "deploy" / rel
            text = target.read_text()
            if text.count(old) != 1:
                failures.append(f"{rel}: the self-test's text {old!r} is not there once; update BREAKS")
                continue
            target.write_text(text.replace(old, new))
            found = check(copy_root / "deploy", copy_root)
            if not any(expected in p for p in found):
                failures.append(f"{rel}: {old!r} -> {new!r} was not caught (wanted {expected!r}, got {found})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="also prove each check can fail")
    args = parser.parse_args()
    problems = check(REPO / "deploy", REPO)
    for p in problems:
        print(f"deploy: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"deploy: manifests valid for Kubernetes {KUBERNETES_VERSION}, kustomizations, compose: ok", file=sys.stderr)
    if args.self_test:
        failures = self_test(REPO)
        for f in failures:
            print(f"deploy self-test: {f}", file=sys.stderr)
        if failures:
            return 1
        print(f"deploy self-test: all {len(BREAKS)} breaks caught", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())

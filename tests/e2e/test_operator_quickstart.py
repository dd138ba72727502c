"""The operator and the workloads together: `noisy-student operator --scheduler local_cwd`
against the test API server runs a NoisyStudentRun with real workload processes.

The run is `examples/quickstart.yaml` itself, as a user applies it, with only
`spec.artifacts.uri` pointed at a temporary `file://` directory: it finished
in about 7 minutes on a busy 2-core machine, well within the e2e budget, so
no smaller stand-in run is needed.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from operator_harness import REPO_ROOT, Harness, OperatorProcess, api_client, apply_crds, run_crd

pytestmark = pytest.mark.e2e

QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"


@pytest.mark.timeout(1800)
def test_operator_runs_the_quickstart_with_local_cwd_jobs(kube_api, tmp_path):
    client = api_client(kube_api.kubeconfig)
    apply_crds(client, [run_crd()])
    document = yaml.safe_load(QUICKSTART.read_text())
    document["spec"]["artifacts"]["uri"] = (tmp_path / "artifacts").as_uri() + "/"
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    name = document["metadata"]["name"]

    operator = OperatorProcess(
        kube_api.kubeconfig,
        tmp_path / "operator.log",
        args=["--all-namespaces", "--scheduler", "local_cwd", "--interval", "2", "--metrics-port", "0"],
        cwd=tmp_path,  # local_cwd jobs work and log under the operator's directory
    )
    operator.start()
    try:
        h = Harness(client, operator)
        h.create_run(namespace, name, document["spec"])
        status = h.wait_run(
            namespace, name,
            lambda s: s.get("stage") in ("Succeeded", "Failed"),
            timeout=1500, what="Succeeded or Failed",
        )
    finally:
        operator.stop()
    assert status["stage"] == "Succeeded", status
    students = len(document["spec"]["students"])
    assert [g["generation"] for g in status["generations"]] == list(range(students + 1))
    for generation in status["generations"]:
        assert 0.0 <= generation["top1"] <= 1.0
        assert generation["parameters"] > 0
    assert status["teacherTop1"] == status["generations"][-1]["top1"]
    last = next(s for s in status["stages"] if s["stage"] == "student" and s["generation"] == students)
    marker = tmp_path / "artifacts" / namespace / "stages" / "student" / last["key"] / "_DONE.json"
    assert json.loads(marker.read_text())["run"] == f"{namespace}/{name}"  # the job knew its run
    assert last["state"] == "Complete" and last["producedBy"] == f"{namespace}/{name}"
    names = [j["name"] for j in status["jobs"]]
    assert len(names) == len(set(names)) == 2 + 3 * students + 1  # prepare, teacher, students' stages, export
    assert status["model"].endswith("/model/") and (tmp_path / "artifacts" / namespace / name / "report.html").exists()

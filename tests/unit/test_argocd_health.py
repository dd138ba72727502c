"""Run the chart's Argo CD health check (Lua) on sample NoisyStudentRun objects.

Argo CD evaluates health checks with gopher-lua, a Lua 5.1 implementation, so
the script runs here on lupa's Lua 5.1 runtime with `obj` set as a global, just
as Argo CD does. The docs must embed the very same script.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51  # Lua 5.1, the language of gopher-lua, which Argo CD embeds

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "charts" / "noisy-student-operator" / "argocd" / "health.lua"
INSTALL_DOC = ROOT / "docs" / "install.md"
ARGOCD_KEY = "resource.customizations.health.noisystudent.dev_NoisyStudentRun"


def run_health_check(obj: dict[str, Any]) -> dict[str, str]:
    """Evaluate health.lua against obj the way Argo CD does; return {status, message}."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return dict(result.items())


def condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


def run(status: dict[str, Any] | None = None, generation: int = 2,
        suspend: bool = False) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "noisystudent.dev/v1alpha1",
        "kind": "NoisyStudentRun",
        "metadata": {"name": "fashion-mnist", "namespace": "ml", "generation": generation},
        "spec": {"suspend": suspend},
    }
    if status is not None:
        obj["status"] = status
    return obj


def all_conditions(**true_ones: tuple[str, str]) -> list[dict[str, str]]:
    """Every condition type, False unless given as type=(reason, message)."""
    types = ["Ready", "Progressing", "Succeeded", "Failed", "Suspended"]
    return [condition(t, "True", *true_ones[t]) if t in true_ones else condition(t, "False", "Idle")
            for t in types]


CASES = {
    "no status yet": (run(None), "Progressing", "Waiting for the operator"),
    "generation not observed yet": (
        run({"observedGeneration": 1, "stage": "Succeeded",
             "conditions": all_conditions(Succeeded=("RunSucceeded", "All generations trained"))}),
        "Progressing", "observe generation 2"),
    "observedGeneration missing": (
        run({"stage": "Pending", "conditions": []}), "Progressing", "observe generation 2"),
    "labeling": (
        run({"observedGeneration": 2, "generation": 1, "stage": "Labeling",
             "conditions": all_conditions(
                 Ready=("Reconciled", "Run is reconciled"),
                 Progressing=("StageRunning", "Generation 1: labeling 16 shards"))}),
        "Progressing", "Generation 1: labeling 16 shards"),
    "stage only, no conditions": (
        run({"observedGeneration": 2, "stage": "Preparing"}), "Progressing", "Stage Preparing"),
    "succeeded": (
        run({"observedGeneration": 2, "stage": "Succeeded",
             "conditions": all_conditions(Ready=("Reconciled", ""),
                                          Succeeded=("RunSucceeded", "All generations trained"))}),
        "Healthy", "All generations trained"),
    "failed": (
        run({"observedGeneration": 2, "stage": "Failed",
             "conditions": all_conditions(
                 Failed=("RetriesExhausted", "Stage gen-1/student failed 3 times: OOMKilled"))}),
        "Degraded", "Stage gen-1/student failed 3 times: OOMKilled"),
    "failed without message": (
        run({"observedGeneration": 2, "stage": "Failed",
             "conditions": all_conditions(Failed=("InvalidSpec", ""))}),
        "Degraded", "InvalidSpec"),
    "failed wins over suspended": (
        run({"observedGeneration": 2, "stage": "Failed",
             "conditions": all_conditions(Failed=("RetriesExhausted", "boom"),
                                          Suspended=("SuspendRequested", "Suspended"))},
            suspend=True),
        "Degraded", "boom"),
    "suspended": (
        run({"observedGeneration": 2, "stage": "Suspended",
             "conditions": all_conditions(Suspended=("SuspendRequested", "Run is suspended"))},
            suspend=True),
        "Suspended", "Run is suspended"),
    "suspend requested, jobs still stopping": (
        run({"observedGeneration": 2, "stage": "Training",
             "conditions": all_conditions(Progressing=("Suspending", "Cancelling 2 jobs"))},
            suspend=True),
        "Progressing", "Cancelling 2 jobs"),
    "resumed after suspend": (
        run({"observedGeneration": 3, "stage": "Training",
             "conditions": all_conditions(Progressing=("StageRunning", "Training student 1"))},
            generation=3),
        "Progressing", "Training student 1"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_health(name: str) -> None:
    obj, want_status, want_message = CASES[name]
    health = run_health_check(obj)
    assert health["status"] == want_status, health
    assert want_message in health["message"], health


def test_every_argo_health_status_is_reachable() -> None:
    reached = {CASES[name][1] for name in CASES}
    assert reached == {"Progressing", "Healthy", "Degraded", "Suspended"}


def test_install_doc_embeds_the_same_script() -> None:
    """docs/install.md's argocd-cm snippet carries health.lua verbatim."""
    text = INSTALL_DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    configmaps = [doc for block in blocks for doc in yaml.safe_load_all(block)
                  if isinstance(doc, dict) and ARGOCD_KEY in (doc.get("data") or {})]
    assert configmaps, f"no argocd-cm snippet with {ARGOCD_KEY} in {INSTALL_DOC}"
    assert configmaps[0]["data"][ARGOCD_KEY] == HEALTH_LUA.read_text()

"""Garbage collection of stage outputs that no live run references.

Stage outputs live under their keys (`<root>/stages/<kind>/<key>/`) and are
shared between runs, so deleting a run deletes none of them. `noisy-student
gc` lists the stage directories under the artifact roots of the live runs
whose keys none of those runs has, with their sizes, and deletes them with
`--yes`. The live runs are the run files named on the command line, or else
every NoisyStudentRun in the API server (the current kubeconfig). A stage
whose lease is held (a job is computing it right now) is never collected::

    noisy-student gc examples/quickstart.yaml            # list
    noisy-student gc examples/quickstart.yaml --yes      # delete
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from noisy_student_workloads.store import ArtifactStore, join_uri, open_store

from .api import NoisyStudentRun
from .core.keys import workload_identity
from .core.layout import LEASE, MARKER, STAGES_DIR, RunLayout


@dataclass(frozen=True)
class StageDirectory:
    """One stage's outputs: `<root>/stages/<kind>/<key>/`."""

    uri: str
    kind: str
    key: str
    files: int
    bytes: int
    complete: bool
    leased: bool


def referenced_stages(runs: Iterable[NoisyStudentRun], scheduler: str | None = None) -> dict[str, set[str]]:
    """Stage prefixes (with a trailing slash) that each live run's current spec uses, by artifact root."""
    referenced: dict[str, set[str]] = {}
    for run in runs:
        workload = workload_identity(run.spec, scheduler or run.spec.scheduler.name)
        layout = RunLayout.for_run(run.spec, run.metadata.namespace, run.metadata.name, workload)
        prefixes = referenced.setdefault(layout.root, set())
        prefixes.update(layout.stage_prefix(stage) + "/" for stage in layout.keys)
    return referenced


def stage_directories(root: str, sizes: Mapping[str, int]) -> list[StageDirectory]:
    """Group the objects below `<root>/stages/` (URI → size) by stage directory."""
    base = join_uri(root, STAGES_DIR) + "/"
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for uri, size in sizes.items():
        parts = uri[len(base):].split("/") if uri.startswith(base) else []
        if len(parts) >= 3:
            groups.setdefault((parts[0], parts[1]), {})[uri] = size
    found = []
    for (kind, key), objects in sorted(groups.items()):
        prefix = f"{base}{kind}/{key}/"
        found.append(StageDirectory(
            uri=prefix, kind=kind, key=key, files=len(objects), bytes=sum(objects.values()),
            complete=prefix + MARKER in objects, leased=prefix + LEASE in objects,
        ))
    return found


def unreferenced(directories: Iterable[StageDirectory], referenced: set[str]) -> list[StageDirectory]:
    """What `gc` may delete: not referenced by a live run, and no job computing it now."""
    return [d for d in directories if d.uri not in referenced and not d.leased]


def collect(
    runs: Iterable[NoisyStudentRun], scheduler: str | None = None, store_for=open_store
) -> list[StageDirectory]:
    """The stage directories that `gc` would delete, under the roots of `runs`."""
    candidates: list[StageDirectory] = []
    for root, prefixes in sorted(referenced_stages(runs, scheduler).items()):
        store: ArtifactStore = store_for(root)
        sizes = store.sizes(join_uri(root, STAGES_DIR) + "/")
        candidates += unreferenced(stage_directories(root, sizes), prefixes)
    return candidates


def delete(directories: Iterable[StageDirectory], store_for=open_store) -> int:
    """Delete every object of each directory, the marker first (so it is never half complete); bytes freed."""
    freed = 0
    for directory in directories:
        store = store_for(directory.uri)
        sizes = store.sizes(directory.uri)
        for uri in sorted(sizes, key=lambda u: not u.endswith("/" + MARKER)):
            store.delete(uri)
            freed += sizes[uri]
    return freed


def runs_from_cluster() -> list[NoisyStudentRun]:
    """Every NoisyStudentRun of the API server of the current kubeconfig (or in-cluster config)."""
    from kubernetes import client, config

    from .api import GROUP, PLURAL, VERSION, parse_run

    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()
    items = client.CustomObjectsApi().list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    runs = []
    for item in items:
        meta = item["metadata"]
        document = {"apiVersion": item["apiVersion"], "kind": item["kind"], "spec": item["spec"],
                    "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")}}
        runs.append(parse_run(document, f"{meta.get('namespace')}/{meta['name']}", tolerant=True))
    return runs


def to_json(directories: Iterable[StageDirectory]) -> str:
    return json.dumps([dataclasses.asdict(d) for d in directories], indent=2)

"""`noisy-student gc`: stage directories no live run references, with sizes; deletion with --yes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from noisy_student_operator.api import load_run_file
from noisy_student_operator.core.keys import workload_identity
from noisy_student_operator.core.layout import MARKER, RunLayout
from noisy_student_operator.gc import collect, delete

ROOT = Path(__file__).resolve().parents[2]


def run_file(tmp_path, name, epochs):
    document = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    document["metadata"]["name"] = name
    document["spec"]["artifacts"]["uri"] = (tmp_path / "artifacts").as_uri() + "/"
    document["spec"]["teacher"]["epochs"] = epochs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def materialise(run):
    """Write every stage of `run` as if it had run (a marker and a 1 KiB output)."""
    layout = RunLayout.for_run(run.spec, run.metadata.namespace, run.metadata.name,
                               workload_identity(run.spec, "local_cwd"))
    for stage in layout.keys:
        directory = Path(layout.stage_prefix(stage).removeprefix("file://"))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "out.bin").write_bytes(b"x" * 1024)
        (directory / MARKER).write_text("{}")
    return layout


def test_lists_and_deletes_only_what_no_live_run_references(tmp_path):
    old = load_run_file(run_file(tmp_path, "exp", epochs=3))
    new_file = run_file(tmp_path, "exp", epochs=4)  # the same run after an edit of the teacher
    new = load_run_file(new_file)
    old_layout, new_layout = materialise(old), materialise(new)
    stale = set(old_layout.keys.values()) - set(new_layout.keys.values())
    assert stale  # the teacher and everything after it

    garbage = collect([new])
    assert {d.key for d in garbage} == stale
    assert all(d.complete and d.files == 2 and d.bytes == 1024 + 2 for d in garbage)

    # A stage being computed right now (its lease is held) is never collected.
    busy = garbage[0]
    Path(busy.uri.removeprefix("file://"), "_LEASE.json").write_text("{}")
    assert busy.key not in {d.key for d in collect([new])}

    listed = subprocess.run([sys.executable, "-m", "noisy_student_operator.cli", "gc", str(new_file), "-o", "json"],
                            capture_output=True, text=True, check=True)
    assert {d["key"] for d in json.loads(listed.stdout)} == stale - {busy.key}
    assert all(Path(d.uri.removeprefix("file://")).exists() for d in garbage)  # listing deletes nothing

    deleted = subprocess.run([sys.executable, "-m", "noisy_student_operator.cli", "gc", str(new_file), "--yes"],
                             capture_output=True, text=True, check=True)
    assert "Deleted" in deleted.stderr
    for stage, key in new_layout.keys.items():
        assert Path(new_layout.stage_prefix(stage).removeprefix("file://"), MARKER).exists()
    assert collect([new]) == []


def test_delete_removes_the_marker_first(tmp_path):
    materialise(load_run_file(run_file(tmp_path, "one", epochs=3)))
    deleted = []

    class Recording:
        def __init__(self, store):
            self.store = store

        def sizes(self, prefix):
            return self.store.sizes(prefix)

        def delete(self, uri):
            deleted.append(uri)
            self.store.delete(uri)

    from noisy_student_workloads.store import open_store

    garbage = collect([load_run_file(run_file(tmp_path, "two", epochs=9))])
    delete(garbage, store_for=lambda uri: Recording(open_store(uri)))
    assert len(garbage) == 8 and len(deleted) == 2 * len(garbage)  # all but the shared prepare stage
    for directory in garbage:
        mine = [u.removeprefix(directory.uri) for u in deleted if u.startswith(directory.uri)]
        assert mine == [MARKER, "out.bin"]  # an interrupted gc never leaves outputs that look complete

"""TorchX components for every Noisy Student stage.

Each function is a typed TorchX component returning an ``AppDef``; its
docstring is the help text of ``torchx run``. The operator builds jobs from
these functions, and its image has no torch, so this module imports only
TorchX (never torch or timm) at import time.

Every stage reads one JSON config (``--config``: inline JSON or a URI); see
:mod:`noisy_student_workloads.config` for the keys.

``local_cwd`` runs the role's entrypoint (``python``, or ``bash -c 'torchrun
...'`` for training) through the job's ``PATH``. When the driver runs from a
virtual environment that is not activated, pass ``env=local_env()`` so the
environment's ``python`` and ``torchrun`` are found.

Example::

    torchx run -s local_cwd workloads/noisy_student_workloads/components.py:train \\
        --config file:///tmp/run/gen-0/teacher/config.json --image . --nnodes 1 --nproc_per_node 2

Annotations stay real types (no ``from __future__ import annotations``):
the ``torchx run`` command line decodes arguments by them.
"""

import os
import re
import sys

from torchx import specs
from torchx.components import dist

_NNODES = re.compile(r"^(\d+)(?::(\d+))?$")


def local_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` plus a ``PATH`` that starts with this interpreter's ``bin`` directory.

    For ``local_cwd`` jobs launched from a non-activated virtual environment:
    the job then finds the same ``python`` and ``torchrun`` as the driver.
    """
    out = dict(env or {})
    bindir = os.path.dirname(sys.executable)
    path = out.get("PATH", os.environ.get("PATH", ""))
    if bindir not in path.split(os.pathsep):
        path = bindir + (os.pathsep + path if path else "")
    out["PATH"] = path
    return out


def _check_nnodes(nnodes: str) -> tuple[int, int]:
    match = _NNODES.match(nnodes.strip())
    if not match:
        raise ValueError(f"nnodes: {nnodes!r} is not 'N' or 'MIN:MAX' (e.g. '1:4')")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if high < 1 or low > high:
        raise ValueError(f"nnodes: {nnodes!r} needs 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def train(
    config: str,
    image: str,
    nnodes: str = "1",
    nproc_per_node: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: dict[str, str] | None = None,
    name: str = "train",
    max_retries: int = 0,
) -> specs.AppDef:
    """Train a teacher or a noisy student with torchrun (elastic DDP).

    The job resumes from the latest epoch checkpoint under the config's
    ``output``, so a restarted or rescheduled job continues where it stopped.

    Args:
        config: the train config, inline JSON or the URI of a JSON file
        image: container image (for local_cwd: the working directory)
        nnodes: number of nodes, or ``MIN:MAX`` for an elastic job
        nproc_per_node: worker processes per node (one per GPU on GPU nodes)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables
        name: job name
        max_retries: scheduler retries of the whole job
    """
    _check_nnodes(nnodes)
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node: {nproc_per_node} must be at least 1")
    return dist.torchrun(
        "--config",
        config,
        m="noisy_student_workloads.train",
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes.strip()}x{nproc_per_node}",
        env=dict(env or {}),
        max_retries=max_retries,
    )


def label(
    config: str,
    image: str,
    replicas: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: dict[str, str] | None = None,
    name: str = "label",
    max_retries: int = 0,
) -> specs.AppDef:
    """Pseudo-label the unlabeled shards with the teacher, in ``replicas`` disjoint parts.

    Replica i labels shards i, i+N, i+2N, ...; the replica that finishes last
    writes the stage's completion marker.

    Args:
        config: the label config, inline JSON or the URI of a JSON file
        image: container image (for local_cwd: the working directory)
        replicas: number of labeling replicas (N)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables
        name: job name
        max_retries: scheduler retries
    """
    if replicas < 1:
        raise ValueError(f"replicas: {replicas} must be at least 1")
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name="label",
                image=image,
                entrypoint="python",
                args=[
                    "-m",
                    "noisy_student_workloads.label",
                    "--config",
                    config,
                    "--replica-id",
                    specs.macros.replica_id,
                    "--num-replicas",
                    str(replicas),
                ],
                num_replicas=replicas,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB),
                env=dict(env or {}),
                max_retries=max_retries,
            )
        ],
    )


def _python_app(
    name: str, role: str, module_args: list[str], image: str, cpu: int, memMB: int, env: dict[str, str] | None
) -> specs.AppDef:
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=role,
                image=image,
                entrypoint="python",
                args=module_args,
                num_replicas=1,
                resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB),
                env=dict(env or {}),
            )
        ],
    )


def balance(
    config: str,
    image: str,
    cpu: int = 1,
    memMB: int = 4096,
    env: dict[str, str] | None = None,
    name: str = "balance",
) -> specs.AppDef:
    """Filter pseudo-labels by confidence and balance classes into a manifest.

    Args:
        config: the balance config, inline JSON or the URI of a JSON file
        image: container image (for local_cwd: the working directory)
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        name: job name
    """
    return _python_app(
        name, "balance", ["-m", "noisy_student_workloads.balance", "--config", config], image, cpu, memMB, env
    )


def prepare(
    image: str,
    source: str,
    output: str,
    labels_per_class: int,
    seed: int = 0,
    shard_size: int = 1000,
    path: str | None = None,
    validation_size: int | None = None,
    test_split: bool = True,
    cpu: int = 1,
    memMB: int = 4096,
    env: dict[str, str] | None = None,
    name: str = "prepare",
) -> specs.AppDef:
    """Pack a dataset into labeled / unlabeled / validation tar shards.

    Args:
        image: container image (for local_cwd: the working directory)
        source: dataset source (digits, mnist, fashion-mnist, folder)
        output: URI prefix the shards are written under
        labels_per_class: labeled images kept per class (the rest are unlabeled)
        seed: seed of the stratified split
        shard_size: images per shard
        path: source directory (fashion-mnist IDX files, image folder)
        validation_size: images held out for validation
        test_split: a source's own test split becomes `test` (validation then comes from its training images)
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        name: job name
    """
    args = [
        "-m",
        "noisy_student_workloads.data",
        "pack",
        "--source",
        source,
        "--output",
        output,
        "--labels-per-class",
        str(labels_per_class),
        "--seed",
        str(seed),
        "--shard-size",
        str(shard_size),
    ]
    if path is not None:
        args += ["--path", path]
    if validation_size is not None:
        args += ["--validation-size", str(validation_size)]
    if not test_split:
        args.append("--no-test-split")
    return _python_app(name, "prepare", args, image, cpu, memMB, env)


def export(
    config: str,
    image: str,
    cpu: int = 1,
    memMB: int = 4096,
    env: dict[str, str] | None = None,
    name: str = "export",
) -> specs.AppDef:
    """Export the best generation of a run in timm's folder layout (config.json, model.safetensors, README.md).

    Args:
        config: the export config, inline JSON or the URI of a JSON file
        image: container image (for local_cwd: the working directory)
        cpu: CPUs
        memMB: memory in MB
        env: extra environment variables
        name: job name
    """
    return _python_app(
        name, "export", ["-m", "noisy_student_workloads.export", "--config", config], image, cpu, memMB, env
    )

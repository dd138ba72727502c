"""The `noisy-student` command line.

    noisy-student run RUN.yaml [--artifacts URI] [--output text|json] [--dry-run]
    noisy-student status RUN.yaml [--artifacts URI] [--output text|json]
    noisy-student export RUN.yaml --generation N --output DIR [--artifacts URI]
    noisy-student predict MODEL_FOLDER|RUN.yaml IMAGE... [--topk K] [--output text|json]
    noisy-student report RUN.yaml [--artifacts URI] [--rebuild] [--no-open]
    noisy-student gc [RUN.yaml ...] [--artifacts URI] [--yes]
    noisy-student crd
    noisy-student operator [--namespace NS ... | --all-namespaces]
    noisy-student data pack --source mnist --labels-per-class 40 --output file:///tmp/mnist/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rich.console import Console

from .api import RunFileError, load_run_file


def _run_parser(sub: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_)
    parser.add_argument("file", help="run file (the YAML that `kubectl apply -f` takes)")
    parser.add_argument("--artifacts", help="artifact prefix URI or directory, replacing spec.artifacts.uri")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisy-student", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = _run_parser(sub, "run", "run a NoisyStudentRun on this machine (TorchX local_cwd)")
    run.add_argument("--dry-run", action="store_true", help="print the next pass's plan and exit")
    _run_parser(sub, "status", "print the status of a local run")
    export = sub.add_parser("export", help="export one generation of a run in timm's folder layout")
    export.add_argument("file", help="the run file")
    export.add_argument("--generation", "-g", type=int, required=True, help="0 = teacher, k = k-th student")
    export.add_argument("--output", required=True, help="directory or URI of the folder to write")
    export.add_argument("--artifacts", help="artifact prefix URI or directory, replacing spec.artifacts.uri")
    predict = sub.add_parser("predict", help="top-k classes of images with an exported model (or a run's)")
    predict.add_argument("model", help="an exported model folder, or a run file (its exported model)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--topk", "-k", type=int, default=5, help="classes per image")
    predict.add_argument("--artifacts", help="with a run file: replaces spec.artifacts.uri")
    predict.add_argument("--output", "-o", choices=("text", "json"), default="text")
    report = sub.add_parser("report", help="open (or rebuild) the run's report.html")
    report.add_argument("file", help="the run file")
    report.add_argument("--artifacts", help="artifact prefix URI or directory, replacing spec.artifacts.uri")
    report.add_argument("--rebuild", action="store_true", help="build it again from the stages' outputs")
    report.add_argument("--no-open", action="store_true", help="print where it is; do not open a browser")
    gc = sub.add_parser("gc", help="list (and with --yes delete) stage outputs that no live run references")
    gc.add_argument("files", nargs="*", help="the live runs' files; none: every run in the API server")
    gc.add_argument("--artifacts", help="artifact prefix URI or directory, replacing each file's spec.artifacts.uri")
    gc.add_argument("--scheduler", choices=("kubernetes", "local_cwd"), default=None,
                    help="the scheduler the runs' stages ran on, when not their spec.scheduler.name")
    gc.add_argument("--yes", action="store_true", help="delete what is listed")
    gc.add_argument("--output", "-o", choices=("text", "json"), default="text")
    crd = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the API models")
    crd.add_argument("--output-file", help="write to this file instead of stdout")
    op = sub.add_parser("operator", help="run the kopf operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="namespace to watch (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    op.add_argument("--metrics-port", type=int, default=8080, help="Prometheus port (0 disables)")
    op.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="kopf liveness endpoint")
    op.add_argument("--scheduler", choices=("kubernetes", "local_cwd"), default=None,
                    help="override every run's spec.scheduler.name; without it only `kubernetes` is served and a "
                         "run asking for local_cwd (processes on the operator's host) is refused")
    op.add_argument("--interval", type=float, default=10.0, help="seconds between re-observations")
    sub.add_parser("data", help="pack data sets into shards (see `noisy-student data --help`)", add_help=False)
    return parser


def _status_json(status) -> str:
    return json.dumps(status.to_api(), indent=2, sort_keys=True)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .core.planner import plan_run
    from .local import LocalRunner, RunFailed, render_table, with_artifacts

    from .preflight import PreflightError, preflight

    run = with_artifacts(load_run_file(args.file), args.artifacts)
    try:
        preflight(run)
    except PreflightError as error:
        console.print(f"[red]error[/red]: {args.file}: {error}")
        return 2
    runner = LocalRunner(run, console=console)
    if args.dry_run:
        status = runner.status_file.load()
        observation = runner.reconciler.observe(runner.ref(status), runner.context)
        print(plan_run(runner.ref(status), observation).describe())
        return 0
    try:
        status = runner.execute()
    except RunFailed as failure:
        console.print(f"[red]Run {run.metadata.name} failed[/red]: {failure}")
        return 1
    except KeyboardInterrupt:
        return 130
    if args.output == "json":
        print(_status_json(status))
    else:
        Console().print(render_table(status))
        console.print(f"Plot: {runner.layout.prefix}/top1.png   Status: {runner.layout.status_uri}")
        console.print(f"Model: {status.model}   Report: {runner.layout.prefix}/report.html")
    return 0


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from .local import StatusFile, render_stages, render_table, with_artifacts

    run = with_artifacts(load_run_file(args.file), args.artifacts)
    status = StatusFile(run).load()
    if args.output == "json":
        print(_status_json(status))
    else:
        console.print(f"stage: {status.stage}  generation: {status.generation}")
        Console().print(render_table(status))
        Console().print(render_stages(status))
    return 0


def cmd_gc(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from . import gc
    from .local import with_artifacts

    if args.files:
        runs = [with_artifacts(load_run_file(f), args.artifacts) for f in args.files]
    else:
        runs = gc.runs_from_cluster()
    garbage = gc.collect(runs, args.scheduler)
    total = sum(d.bytes for d in garbage)
    if args.output == "json":
        print(gc.to_json(garbage))
    else:
        table = Table(title=f"Stage outputs no live run references ({len(runs)} live runs)")
        for column in ("stage", "key", "files", "MiB", "complete", "location"):
            table.add_column(column, justify="right" if column in ("files", "MiB") else "left")
        for d in garbage:
            table.add_row(d.kind, d.key, str(d.files), f"{d.bytes / 2**20:.1f}", "yes" if d.complete else "no", d.uri)
        Console().print(table)
    if args.yes and garbage:
        freed = gc.delete(garbage)
        console.print(f"Deleted {len(garbage)} stage directories ({freed / 2**20:.1f} MiB).")
    elif garbage:
        console.print(f"{len(garbage)} stage directories, {total / 2**20:.1f} MiB; run again with --yes to delete them.")
    else:
        console.print("Nothing to collect.")
    return 0


def _run_layout(run):
    """The layout (stage keys) the run's stages were computed under.

    The workload identity enters every key: the local runner records it in the run's `stages.json`;
    without one, it follows `spec.scheduler.name` (the image on a cluster).
    """
    from noisy_student_workloads.store import open_store

    from .core.layout import RunLayout

    meta, spec = run.metadata, run.spec
    layout = RunLayout.for_run(spec, meta.namespace, meta.name)
    store = open_store(layout.manifest_uri)
    if store.exists(layout.manifest_uri):
        layout = RunLayout.for_run(spec, meta.namespace, meta.name, store.get_json(layout.manifest_uri)["workload"])
    return layout


def _export_config(run):
    """The run's export config (`render.render_export_config`)."""
    from noisy_student_workloads.config import ExportConfig

    from .core.render import render_export_config

    layout = _run_layout(run)
    return layout, ExportConfig(**render_export_config(run.spec, layout))


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from noisy_student_workloads import export
    from noisy_student_workloads.config import ConfigError

    from .local import with_artifacts

    run = with_artifacts(load_run_file(args.file), args.artifacts)
    _, cfg = _export_config(run)
    try:
        trained, stopped_after = export.trained_generations(cfg)
    except ConfigError as error:
        trained, stopped_after = [], None
        missing = str(error)
    else:
        missing = ""
    chosen = next((t for t in trained if t.generation == args.generation), None)
    if chosen is None:
        console.print(f"[red]error[/red]: --generation {args.generation}: not trained "
                      f"({len(trained)} generations have completed{'; ' + missing if missing else ''})")
        return 2
    output = args.output if "://" in args.output else "file://" + os.path.abspath(args.output)
    export.save_timm_folder(chosen.checkpoint, output, export.model_card(cfg, trained, chosen, stopped_after))
    console.print(f"Exported generation {chosen.generation} ({chosen.metrics.get('model')}, "
                  f"top-1 {chosen.top1:.4f}) to {output}")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from noisy_student_workloads import export
    from noisy_student_workloads.config import ConfigError
    from noisy_student_workloads.report import REPORT_FILE
    from noisy_student_workloads.store import join_uri, open_store

    from .local import with_artifacts

    run = with_artifacts(load_run_file(args.file), args.artifacts)
    layout, cfg = _export_config(run)
    uri = join_uri(layout.prefix, REPORT_FILE)
    if args.rebuild or not open_store(uri).exists(uri):
        try:
            trained, stopped_after = export.trained_generations(cfg)
        except ConfigError as error:
            console.print(f"[red]error[/red]: no report: {error}")
            return 2
        uri = export.write_report(cfg, trained, export.best(trained).generation, stopped_after, stage=False,
                                  title=f"{run.metadata.namespace}/{run.metadata.name}")
    print(uri)
    if not args.no_open and uri.startswith("file://"):
        import webbrowser

        webbrowser.open(uri)
    return 0


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from noisy_student_workloads.predict import predict
    from noisy_student_workloads.store import join_uri, open_store

    from .local import with_artifacts

    folder = args.model
    if os.path.isfile(folder):
        run = with_artifacts(load_run_file(folder), args.artifacts)
        folder = _run_layout(run).model_uri(run.spec)
        if not open_store(folder).exists(join_uri(folder, "config.json")):
            console.print(f"[red]error[/red]: {args.model}: the run has no exported model yet (none at {folder})")
            return 2
    for image in args.images:
        if not os.path.isfile(image):
            console.print(f"[red]error[/red]: {image}: no such image file")
            return 2
    try:
        results = predict(folder, args.images, args.topk)
    except FileNotFoundError as error:
        console.print(f"[red]error[/red]: {error}")
        return 2
    if args.output == "json":
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title=f"Predictions of {folder}")
    for column in ("image", "rank", "class", "probability"):
        table.add_column(column, justify="left" if column == "image" else "right")
    for result in results:
        for rank, top in enumerate(result["top"], 1):
            table.add_row(os.path.basename(result["image"]) if rank == 1 else "", str(rank), str(top["class"]),
                          f"{top['probability']:.4f}")
    Console().print(table)
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from .crd import render_crd_yaml

    text = render_crd_yaml()
    if args.output_file:
        with open(args.output_file, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"]:
        from noisy_student_workloads.data import main as data_main

        return data_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    console = Console(stderr=True, soft_wrap=True)
    try:
        if args.command == "run":
            return cmd_run(args, console)
        if args.command == "status":
            return cmd_status(args, console)
        if args.command == "export":
            return cmd_export(args, console)
        if args.command == "report":
            return cmd_report(args, console)
        if args.command == "predict":
            return cmd_predict(args, console)
        if args.command == "gc":
            return cmd_gc(args, console)
        if args.command == "crd":
            return cmd_crd(args)
        if args.command == "operator":
            from .operator_main import run_operator

            return run_operator(args)
    except RunFileError as error:
        console.print(f"[red]error[/red]: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

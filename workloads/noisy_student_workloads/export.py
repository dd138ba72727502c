"""Export the best generation of a run in timm's own folder layout.

The last stage of every run. It reads each generation's completion marker
in order (teacher, then students), stops where the run stopped
(``stop_when_gain_below``: a student that gained less than that over its
teacher ends the run), and exports the generation with the best validation
top-1 (the earlier one on a tie) with ``timm.models.save_for_hf``::

    <output>/model/config.json        architecture, num_classes, pretrained_cfg (input size, mean/std)
    <output>/model/model.safetensors  the final checkpoint's weights (its EMA weights when it has them)
    <output>/model/README.md          a model card: generations, data, recipe, stage keys
    <output>/report.html              the run's report (see :mod:`.report`; a copy under ``run_prefix``)
    <output>/tensorboard/             per-epoch and per-generation scalars (``tensorboard --logdir``)
    <output>/_DONE.json               last

The folder loads with ``timm.create_model("local-dir:<folder>", pretrained=True)``
and predicts as the workloads do: resize to the input size, normalise.

Example::

    python -m noisy_student_workloads.export --config file:///tmp/run/export.json
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, ExportConfig
from .stage import DONE, event, put, run_entry_point, write_done
from .store import join_uri, open_store

MODEL_DIR = "model"


@dataclass(frozen=True)
class Trained:
    """One trained generation: its stage output prefix and what its marker says."""

    generation: int
    prefix: str
    metrics: dict[str, Any]

    @property
    def top1(self) -> float:
        return float(self.metrics.get("top1") or 0.0)

    @property
    def key(self) -> str:
        return self.prefix.rstrip("/").rsplit("/", 1)[-1]

    @property
    def checkpoint(self) -> str:
        return join_uri(self.prefix, "checkpoint.pt")


def trained_generations(cfg: ExportConfig) -> tuple[list[Trained], int | None]:
    """The generations the run trained, and the one it stopped after (None: it trained them all)."""
    trained: list[Trained] = []
    for generation, prefix in enumerate(cfg.generations):
        uri = join_uri(prefix, DONE)
        store = open_store(uri)
        if not store.exists(uri):
            raise ConfigError(f"generations[{generation}]: {prefix} has no completion marker ({DONE})")
        trained.append(Trained(generation, prefix, store.get_json(uri).get("metrics") or {}))
        threshold = cfg.stop_when_gain_below
        last = generation == len(cfg.generations) - 1
        if generation and threshold is not None and not last:
            if trained[-1].top1 - trained[-2].top1 < threshold:
                return trained, generation
    return trained, None


def best(trained: Sequence[Trained]) -> Trained:
    """The generation with the best validation top-1; the earlier (smaller) one on a tie."""
    return max(trained, key=lambda t: (t.top1, -t.generation))


def model_card(cfg: ExportConfig, trained: Sequence[Trained], chosen: Trained, stopped_after: int | None) -> str:
    """The README.md of the exported folder (a Hugging Face model card with timm metadata)."""
    model = chosen.metrics.get("model", "unknown")
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, noisy-student]",
        "---",
        f"# {model}, generation {chosen.generation} of a Noisy Student run",
        "",
        f"Validation top-1 {chosen.top1:.4f} ({chosen.metrics.get('validation_images', '?')} images), "
        f"{cfg.num_classes} classes. Load it with timm:",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:<this folder>", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
        "```",
        "",
        "## Generations",
        "",
        "| generation | role | model | parameters | top-1 | top-5 | stage key | exported |",
        "|---:|---|---|---:|---:|---:|---|---|",
    ]
    for t in trained:
        m = t.metrics
        lines.append(
            f"| {t.generation} | {'teacher' if t.generation == 0 else 'student'} | {m.get('model', '?')} "
            f"| {m.get('parameters', '?')} | {t.top1:.4f} | {float(m.get('top5') or 0):.4f} | `{t.key}` "
            f"| {'yes' if t is chosen else ''} |"
        )
    if stopped_after is not None:
        lines += ["", f"The run stopped after generation {stopped_after}: its student gained less than "
                      f"{cfg.stop_when_gain_below:g} top-1 over its teacher (`stopWhenGainBelow`)."]
    lines += ["", "## Data", "", f"- validation: `{cfg.validation}`", f"- unlabeled: `{cfg.unlabeled}`"]
    lines += ["", "## Stage keys", ""]
    lines += [f"- training of generation {t.generation}: `{t.prefix}`" for t in trained]
    lines += [f"- pseudo labels of generation {g + 1}: `{u}`" for g, u in enumerate(cfg.labels[: len(trained) - 1])]
    lines += [f"- balanced manifest of generation {g + 1}: `{u}`"
              for g, u in enumerate(cfg.balances[: len(trained) - 1])]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(cfg.recipe, sort_keys=True).rstrip(), "```", ""]
    return "\n".join(lines)


def save_timm_folder(checkpoint: str, folder: str, card: str, digests: dict[str, str] | None = None) -> list[str]:
    """Write a final checkpoint as a timm folder (``save_for_hf``) plus ``card`` to ``folder``; returns the URIs."""
    from timm.models import save_for_hf

    from .models import load_final

    model, meta = load_final(checkpoint)
    size = int(meta["image_size"])
    data_config = {
        "input_size": (3, size, size),
        "interpolation": "bilinear",  # the workloads' resize (see pipeline.decode)
        "crop_pct": 1.0,  # resize only: no crop
        "crop_mode": "center",
        "mean": tuple(meta["mean"]),
        "std": tuple(meta["std"]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # model_args rebuild the same architecture (e.g. output_stride) in timm.create_model.
        model_args = {**dict(meta.get("model_args") or {}), "num_classes": int(meta["num_classes"])}
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True, data_config=data_config)
        Path(tmp, "README.md").write_text(card)
        return [put(join_uri(folder, p.name), p.read_bytes(), digests) for p in sorted(Path(tmp).iterdir())]


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export the best generation; returns the marker's metrics."""
    trained, stopped_after = trained_generations(cfg)
    chosen = best(trained)
    folder = join_uri(cfg.output, MODEL_DIR) + "/"
    digests: dict[str, str] = {}
    save_timm_folder(chosen.checkpoint, folder, model_card(cfg, trained, chosen, stopped_after), digests)
    metrics = {
        "generation": chosen.generation,
        "model": chosen.metrics.get("model"),
        "top1": chosen.top1,
        "top5": chosen.metrics.get("top5"),
        "generations": len(trained),
        "stopped_after": stopped_after,
        "folder": folder,
    }
    event("exported", **metrics)
    write_report(cfg, trained, chosen.generation, stopped_after, digests)
    write_done(cfg.output, "export", metrics, digests)
    return metrics


def write_report(cfg: ExportConfig, trained: Sequence[Trained], chosen: int, stopped_after: int | None,
                 digests: dict[str, str] | None = None, stage: bool = True, title: str = "Noisy Student run") -> str:
    """``report.html`` under the run's prefix, and with ``stage`` also the report and TensorBoard scalars
    under the export's output (``stage=False`` rebuilds a completed run's report without touching its stage)."""
    from . import report

    generations = report.collect(cfg, trained)
    page = report.render_html(title, generations, chosen, stopped_after).encode()
    uri = ""
    if stage:
        uri = put(join_uri(cfg.output, report.REPORT_FILE), page, digests)
        report.write_tensorboard(join_uri(cfg.output, report.TENSORBOARD_DIR), generations, digests)
    if cfg.run_prefix:
        uri = put(join_uri(cfg.run_prefix, report.REPORT_FILE), page)
    event("report", uri=uri)
    return uri


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point("Export the best generation in timm's folder layout.", ExportConfig,
                           lambda cfg, _: run(cfg), argv)


if __name__ == "__main__":
    sys.exit(main())

"""The run's report: one self-contained ``report.html`` (inline PNGs, no JavaScript) and TensorBoard scalars.

Built by the export stage (and again by ``noisy-student report``) from what
the stages wrote: each generation's marker and ``metrics.json`` (per-epoch
loss and top-1), the label stage's confidence histograms and predictions, the
balance stage's per-class counts, and each generation's predictions on the
validation shards (per-class accuracy, confusion matrix). When the unlabeled
images' true classes are known — a prepared data set keeps them aside in
``unlabeled-truth.npz`` — it adds pseudo-label accuracy per class and against
confidence. Sections (their ``id``): ``generations``, ``curves``,
``pseudo-labels``, ``balance``, ``per-class``, ``confusion``,
``pseudo-label-accuracy``.

Example::

    python -c "from noisy_student_workloads.report import SECTIONS; print(SECTIONS)"
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExportConfig
from .stage import put
from .store import expand_shards, join_uri, open_store

REPORT_FILE = "report.html"
TENSORBOARD_DIR = "tensorboard"
TRUTH_FILE = "unlabeled-truth.npz"  # datasets.TRUTH_FILE, without importing the packers
SECTIONS = ("generations", "curves", "pseudo-labels", "balance", "per-class", "confusion", "pseudo-label-accuracy")
EVAL_BATCH = 256


@dataclass
class Generation:
    """What the report shows of one generation."""

    generation: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    confusion: np.ndarray  # true × predicted counts on the validation shards
    histograms: np.ndarray | None = None  # class × 100 confidence bins of the pseudo labels it trained on
    balance: list[dict[str, Any]] = field(default_factory=list)  # per class: predicted, above_threshold, after
    truth: dict[str, np.ndarray] | None = None  # true and pseudo classes, confidences of the unlabeled images


def confusion_matrix(checkpoint: str, validation: str, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) on the validation shards, with the workloads' eval transform."""
    import torch

    from .images import normalize
    from .models import load_final
    from .pipeline import ShardCatalog, decode, stream_samples, to_tensor

    model, meta = load_final(checkpoint)
    store = open_store(validation)
    uris = expand_shards(validation, store)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def score(xs: list[Any], ys: list[int]) -> None:
        with torch.inference_mode():
            predicted = model(normalize(torch.stack(xs), meta["mean"], meta["std"])).argmax(dim=1).numpy()
        np.add.at(counts, (np.asarray(ys), predicted), 1)

    xs, ys = [], []
    for sample in stream_samples(uris, store, ShardCatalog.of(uris, store)):
        xs.append(to_tensor(decode(sample, int(meta["image_size"]))))
        ys.append(int(sample["label"]))
        if len(xs) == EVAL_BATCH:
            score(xs, ys)
            xs, ys = [], []
    if xs:
        score(xs, ys)
    return counts


def pseudo_label_truth(labels: str, unlabeled: str) -> dict[str, np.ndarray] | None:
    """True class, pseudo class and confidence of each labeled unlabeled image; None without kept-aside truth."""
    from .predictions import read_parts

    truth_uri = join_uri(unlabeled.rsplit("/", 1)[0], TRUTH_FILE)
    store = open_store(truth_uri)
    if not store.exists(truth_uri):
        return None
    with np.load(io.BytesIO(store.get_bytes(truth_uri)), allow_pickle=False) as z:
        known = dict(zip(z["keys"].tolist(), z["labels"].tolist()))
    true, pseudo, confidence = [], [], []
    for part in read_parts(labels, ("keys", "classes", "confidences")):
        for key, c, p in zip(part["keys"].tolist(), part["classes"].tolist(), part["confidences"].tolist()):
            if key in known:
                true.append(known[key])
                pseudo.append(c)
                confidence.append(p)
    return {"true": np.asarray(true), "pseudo": np.asarray(pseudo), "confidence": np.asarray(confidence)}


def collect(cfg: ExportConfig, trained: Sequence[Any]) -> list[Generation]:
    """Read (and for the confusion matrices, compute) what the report shows of each trained generation."""
    from .predictions import read_histograms

    out = []
    for t in trained:
        metrics_uri = join_uri(t.prefix, "metrics.json")
        history = open_store(metrics_uri).get_json(metrics_uri).get("history", [])
        g = Generation(t.generation, t.metrics, history, confusion_matrix(t.checkpoint, cfg.validation,
                                                                        cfg.num_classes))
        if t.generation > 0:
            labels, balance = cfg.labels[t.generation - 1], cfg.balances[t.generation - 1]
            g.histograms = read_histograms(labels)
            thresholds = join_uri(balance, "thresholds.json")
            g.balance = open_store(thresholds).get_json(thresholds).get("classes", [])
            g.truth = pseudo_label_truth(labels, cfg.unlabeled)
        out.append(g)
    return out


# ----------------------------------------------------------------------------- rendering


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _figure(panels: int, height: float = 2.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(3.4 * panels, height), squeeze=False)
    return figure, axes[0]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def render_html(title: str, generations: Sequence[Generation], chosen: int, stopped_after: int | None) -> str:
    """The report as one HTML document."""
    sections: dict[str, str] = {}
    rows = [[g.generation, "teacher" if g.generation == 0 else "student", g.metrics.get("model"),
             g.metrics.get("parameters"), _fmt(g.metrics.get("top1")), _fmt(g.metrics.get("top5")),
             _fmt(g.metrics.get("test_top1")), _fmt(g.metrics.get("corruption_top1")),
             "yes" if g.generation == chosen else ""] for g in generations]
    note = (f"<p>Stopped after generation {stopped_after} (<code>stopWhenGainBelow</code>).</p>"
            if stopped_after is not None else "")
    sections["generations"] = _table(
        ["generation", "role", "model", "parameters", "top-1", "top-5", "test top-1", "corrupted top-1", "exported"],
        rows) + note

    figure, (loss, top1) = _figure(2)
    for g in generations:
        epochs = [h["epoch"] for h in g.history]
        loss.plot(epochs, [h["loss"] for h in g.history], marker=".", label=f"g{g.generation}")
        top1.plot(epochs, [h["top1"] for h in g.history], marker=".", label=f"g{g.generation}")
    loss.set(title="training loss", xlabel="epoch")
    top1.set(title="validation top-1", xlabel="epoch")
    top1.legend(fontsize=7)
    sections["curves"] = _png(figure)

    students = [g for g in generations if g.generation > 0]
    parts = []
    for g in students:
        figure, (hist, balance) = _figure(2)
        if g.histograms is not None and g.histograms.size:
            hist.bar(np.arange(g.histograms.shape[1]) / g.histograms.shape[1], g.histograms.sum(axis=0),
                     width=1 / g.histograms.shape[1], align="edge")
        hist.set(title=f"g{g.generation}: pseudo-label confidence", xlabel="confidence", ylabel="images")
        classes = np.arange(len(g.balance))
        balance.bar(classes - 0.2, [c["predicted"] for c in g.balance], width=0.4, label="predicted")
        balance.bar(classes + 0.2, [c["after"] for c in g.balance], width=0.4, label="after filter + balance")
        balance.set(title=f"g{g.generation}: images per class", xlabel="class")
        balance.legend(fontsize=7)
        parts.append(_png(figure))
    sections["pseudo-labels"] = "".join(parts) or "<p>No student was trained.</p>"
    sections["balance"] = "".join(
        f"<h3>Generation {g.generation}</h3>" + _table(
            ["class", "threshold", "predicted", "above threshold", "kept", "after balancing"],
            [[c["class"], f"{c['threshold']:.2f}", c["predicted"], c["above_threshold"], c["kept"], c["after"]]
             for c in g.balance]) for g in students) or "<p>No student was trained.</p>"

    accuracy = [np.diag(g.confusion) / np.maximum(g.confusion.sum(axis=1), 1) for g in generations]
    sections["per-class"] = _table(
        ["class", *[f"g{g.generation}" for g in generations]],
        [[c, *[f"{a[c]:.3f}" for a in accuracy]] for c in range(len(accuracy[0]))])
    figure, axes = _figure(len(generations), height=3.2)
    for ax, g in zip(axes, generations):
        ax.imshow(g.confusion, cmap="Blues")
        ax.set(title=f"g{g.generation}: confusion", xlabel="predicted", ylabel="true")
    sections["confusion"] = _png(figure)

    known = [g for g in students if g.truth is not None and g.truth["true"].size]
    parts = []
    for g in known:
        t = g.truth
        right = t["true"] == t["pseudo"]
        classes = np.arange(len(g.balance) or int(t["true"].max()) + 1)
        per_class = [right[t["true"] == c].mean() if (t["true"] == c).any() else 0.0 for c in classes]
        bins = np.linspace(0, 1, 11)
        which = np.clip(np.digitize(t["confidence"], bins) - 1, 0, 9)
        by_confidence = [right[which == b].mean() if (which == b).any() else np.nan for b in range(10)]
        figure, (cls, conf) = _figure(2)
        cls.bar(classes, per_class)
        cls.set(title=f"g{g.generation}: pseudo-label accuracy per class", xlabel="true class", ylim=(0, 1))
        conf.plot(bins[:-1] + 0.05, by_confidence, marker="o")
        conf.plot([0, 1], [0, 1], ls=":", color="grey")
        conf.set(title=f"g{g.generation}: accuracy against confidence", xlabel="confidence", ylim=(0, 1))
        parts.append(f"<p>Generation {g.generation}: {right.mean():.3f} of {right.size} pseudo labels are right.</p>"
                     + _png(figure))
    sections["pseudo-label-accuracy"] = "".join(parts) or (
        "<p>The unlabeled images' true classes are not known (only prepared data sets keep them aside).</p>")

    titles = {"generations": "Generations", "curves": "Per-epoch curves", "pseudo-labels":
              "Pseudo labels: confidence and class balance", "balance": "Filtering and balancing per class",
              "per-class": "Per-class validation accuracy", "confusion": "Confusion matrices",
              "pseudo-label-accuracy": "Pseudo-label accuracy"}
    body = "".join(f'<section id="{k}"><h2>{titles[k]}</h2>{sections[k]}</section>' for k in SECTIONS)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def write_tensorboard(folder: str, generations: Sequence[Generation], digests: dict[str, str] | None = None) -> None:
    """Per-epoch loss and top-1 of every generation, and top-1 per generation, as TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        for g in generations:
            with SummaryWriter(str(Path(tmp, f"generation-{g.generation}"))) as writer:
                for h in g.history:
                    writer.add_scalar("train/loss", h["loss"], h["epoch"])
                    writer.add_scalar("validation/top1", h["top1"], h["epoch"])
        with SummaryWriter(str(Path(tmp, "run"))) as writer:
            for g in generations:
                writer.add_scalar("generation/top1", float(g.metrics.get("top1") or 0.0), g.generation)
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            put(join_uri(folder, *path.relative_to(tmp).parts), path.read_bytes(), digests)

"""Predict with an exported model folder: timm's loader and timm's eval transform, nothing of our own.

The folder is what the export stage writes (``config.json``, ``model.safetensors``):
``timm.create_model("local-dir:<folder>", pretrained=True)`` builds the model,
and ``resolve_data_config`` + ``create_transform`` its eval transform (resize
to the input size, normalise), the same the workloads apply.

Example::

    python -m noisy_student_workloads.predict /tmp/run/model/ digit.png --topk 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .store import join_uri, open_store

FOLDER_FILES = ("config.json", "model.safetensors", "README.md")


def local_folder(uri: str, scratch: str) -> Path:
    """A local directory holding the exported folder at ``uri`` (copied from S3 into ``scratch``)."""
    if "://" not in uri:
        return Path(uri)
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    for name in FOLDER_FILES[:2]:
        source = join_uri(uri, name)
        Path(scratch, name).write_bytes(open_store(source).get_bytes(source))
    return Path(scratch)


def load(folder: Path) -> tuple[Any, Any]:
    """The model (eval mode) and its eval transform."""
    import timm
    from timm.data import create_transform, resolve_data_config

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (not an exported model folder)")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return model, create_transform(**resolve_data_config({}, model=model))


def predict(folder_uri: str, images: Sequence[str], topk: int = 5) -> list[dict[str, Any]]:
    """Top-k classes and probabilities of each image."""
    import torch
    from PIL import Image

    with tempfile.TemporaryDirectory() as scratch:
        model, transform = load(local_folder(folder_uri, scratch))
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    with torch.inference_mode():
        probs = model(batch).softmax(dim=1)
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [
        {"image": str(path), "top": [{"class": int(c), "probability": round(float(p), 6)}
                                     for c, p in zip(top.indices[i], top.values[i])]}
        for i, path in enumerate(images)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Top-k classes of images with an exported model folder.")
    parser.add_argument("folder", help="exported model folder (directory or URI)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--topk", "-k", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(predict(args.folder, args.images, args.topk), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

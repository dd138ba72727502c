"""timm models by name, and the final checkpoint format shared by train and label.

A final checkpoint (``checkpoint.pt``) holds only plain data — the model's
state dict, its timm name, ``num_classes``, ``image_size`` and the
normalisation ``mean``/``std`` — so it loads with ``weights_only=True``.

Example::

    python -c "from noisy_student_workloads.models import create_model; print(create_model('resnet18', 10))"
"""

from __future__ import annotations

import difflib
import io
from typing import Any

import torch

from .config import ConfigError
from .store import open_store


def create_model(name: str, num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0) -> torch.nn.Module:
    """``timm.create_model`` with dropout before the classifier and stochastic depth.

    Raises :class:`ConfigError` naming ``model`` (with close matches) for an unknown name.
    """
    import timm

    if not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        if not close:
            close = timm.list_models(f"*{name[:6]}*")[:5]
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"model: unknown timm model {name!r}{hint}")
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=3, drop_rate=dropout, drop_path_rate=stochastic_depth
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def normalization(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    """The model's default input mean/std (timm's pretrained config; 0.5 when it has none)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return list(cfg.get("mean", (0.5,) * 3)), list(cfg.get("std", (0.5,) * 3))


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity (they would turn every pseudo-label into class 0)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"checkpoint: {what} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]!r})")


def save_final(uri: str, model: torch.nn.Module, name: str, num_classes: int, image_size: int) -> bytes:
    """Write the final checkpoint to ``uri``; returns the bytes written (for the digest)."""
    mean, std = normalization(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_finite(state, f"the model to be written to {uri}")
    payload = {
        "model": name,
        "num_classes": num_classes,
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "state_dict": state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    open_store(uri).put_bytes(uri, data)
    return data


def load_final(uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a final checkpoint: the model (eval mode, no dropout or drop path) and its metadata."""
    try:
        data = open_store(uri).get_bytes(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint: {exc}") from None
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    missing = {"model", "num_classes", "image_size", "state_dict"} - set(payload)
    if missing:
        raise ConfigError(f"checkpoint: {uri} is not a final checkpoint (missing {sorted(missing)})")
    check_finite(payload["state_dict"], uri)
    model = create_model(payload["model"], payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta.setdefault("mean", normalization(model)[0])
    meta.setdefault("std", normalization(model)[1])
    return model, meta

"""timm models by name, and the final checkpoint format shared by train and label.

A final checkpoint (``checkpoint.pt``) holds only plain data — the model's
state dict, its timm name and constructor arguments (``model_args``),
``num_classes``, ``image_size`` and the normalisation ``mean``/``std`` — so it
loads with ``weights_only=True``. When training kept an exponential moving
average of the weights, ``ema`` holds its state dict (parameters and
BatchNorm statistics): those are the weights that were evaluated, that label
the next generation, and that an export should use; ``state_dict`` stays the
raw trained weights.

Example::

    python -c "from noisy_student_workloads.models import create_model; print(create_model('resnet18', 10))"
"""

from __future__ import annotations

import difflib
import io
from collections.abc import Mapping
from typing import Any

import torch

from .config import ConfigError
from .store import open_store


def create_model(name: str, num_classes: int, dropout: float = 0.0, stochastic_depth: float = 0.0,
                 model_args: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """``timm.create_model`` with dropout before the classifier, stochastic depth and the model's own
    keyword arguments (``model_args``, e.g. ``{"stem_stride": 1}``).

    Raises :class:`ConfigError` naming ``model`` (with close matches) for an unknown name, and
    ``model_args`` for an argument the model's constructor does not take.
    """
    import timm

    if not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        if not close:
            close = timm.list_models(f"*{name[:6]}*")[:5]
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"model: unknown timm model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=3, drop_rate=dropout,
                                 drop_path_rate=stochastic_depth, **dict(model_args or {}))
    except (TypeError, ValueError, AssertionError) as exc:  # the constructor's own message names the argument
        if not model_args:
            raise
        raise ConfigError(f"model_args: {name!r} does not take {dict(model_args or {})}: {exc}") from None


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


def save_final(uri: str, model: torch.nn.Module, name: str, num_classes: int, image_size: int,
               model_args: Mapping[str, Any] | None = None, ema: torch.nn.Module | None = None) -> bytes:
    """Write the final checkpoint to ``uri``; returns the bytes written (for the digest)."""
    mean, std = normalization(model)
    payload: dict[str, Any] = {
        "model": name,
        "model_args": dict(model_args or {}),
        "num_classes": num_classes,
        "image_size": image_size,
        "mean": mean,
        "std": std,
    }
    for key, module in (("state_dict", model), ("ema", ema)):
        if module is not None:
            payload[key] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            check_finite(payload[key], f"the model to be written to {uri}")
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    open_store(uri).put_bytes(uri, data)
    return data


def read_final(uri: str, field: str = "checkpoint") -> tuple[dict[str, Any], str]:
    """A final checkpoint's payload and the key of the weights to use (``ema`` when there is one);
    errors name ``field``."""
    try:
        data = open_store(uri).get_bytes(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    missing = {"model", "num_classes", "image_size", "state_dict"} - set(payload)
    if missing:
        raise ConfigError(f"{field}: {uri} is not a final checkpoint (missing {sorted(missing)})")
    weights = "ema" if "ema" in payload else "state_dict"
    check_finite(payload[weights], uri)
    return payload, weights


def start_from(uri: str, model: torch.nn.Module, name: str, num_classes: int,
               model_args: Mapping[str, Any] | None = None) -> None:
    """Load a final checkpoint's weights (its average when it has one) into ``model``, which must be the
    same model with the same constructor arguments and classes; errors name ``init``."""
    payload, weights = read_final(uri, "init")
    theirs = (payload["model"], dict(payload.get("model_args") or {}), payload["num_classes"])
    ours = (name, dict(model_args or {}), num_classes)
    if theirs != ours:
        raise ConfigError(f"init: {uri} holds {theirs[0]!r} with model_args {theirs[1]} and {theirs[2]} classes, "
                          f"not {ours[0]!r} with {ours[1]} and {ours[2]}; a model starts only from its own kind")
    model.load_state_dict(payload[weights])


def load_final(uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a final checkpoint: the model (eval mode, no dropout or drop path; the ``ema`` weights when
    there are some) and its metadata (``weights``: ``ema`` or ``state_dict``)."""
    payload, weights = read_final(uri)
    model = create_model(payload["model"], payload["num_classes"], model_args=payload.get("model_args"))
    model.load_state_dict(payload[weights])
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "ema")}
    meta["weights"] = weights
    meta.setdefault("mean", normalization(model)[0])
    meta.setdefault("std", normalization(model)[1])
    return model, meta

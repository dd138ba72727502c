"""Kubernetes-style conditions: keyed by type, transition time kept unless status flips."""

from __future__ import annotations

from datetime import datetime

from ..api import Condition
from . import reasons


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None,
) -> list[Condition]:
    """Return the full list with `type_` set; `lastTransitionTime` moves only on a flip."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    transition = previous.last_transition_time if previous and previous.status == value else now
    updated = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=observed_generation,
    )
    others = [c for c in conditions if c.type != type_]
    merged = others + [updated]
    order = {t: i for i, t in enumerate(reasons.CONDITION_TYPES)}
    return sorted(merged, key=lambda c: order.get(c.type, len(order)))


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.status == "True"

"""Registry of evaluation metrics, so that a config file or the CLI can name a metric by a string.

Every registered metric is a plain function that returns a JSON-serialisable ``dict`` of floats (and,
where useful, lists of per-example floats). Metrics that need a model take ``(model, tokenizer, ...)``
first; metrics that combine numbers already computed (``privleak``, ``forget_quality``,
``model_utility``) take those numbers. Lookup is by exact name, never by substring: choosing an
algorithm by a fragment of a string is how the wrong metric ends up in a results table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import MoEUnlearnError

MetricFn = Callable[..., dict[str, Any]]
_F = TypeVar("_F", bound=MetricFn)

_METRICS: dict[str, MetricFn] = {}


def register_metric(name: str) -> Callable[[_F], _F]:
    """Decorator that registers ``fn`` under ``name`` and returns it unchanged.

    Registering two different functions under one name is an error (it would silently replace a
    metric that results were already reported with); re-registering the same function, as happens when
    a module is reloaded, is allowed.
    """
    if not isinstance(name, str) or not name:
        raise MoEUnlearnError(f"A metric name must be a non-empty string, got {name!r}.")

    def decorator(fn: _F) -> _F:
        existing = _METRICS.get(name)
        if existing is not None and _qualified_name(existing) != _qualified_name(fn):
            raise MoEUnlearnError(
                f"Metric name {name!r} is already registered by {_qualified_name(existing)}; "
                f"pick another name for {_qualified_name(fn)}."
            )
        _METRICS[name] = fn
        return fn

    return decorator


def get_metric(name: str) -> MetricFn:
    """Return the metric registered under ``name``; the error lists every registered name."""
    try:
        return _METRICS[name]
    except KeyError:
        raise MoEUnlearnError(
            f"Unknown metric {name!r}. Registered metrics: {', '.join(list_metrics())}. "
            "Register a new one with @register_metric('name')."
        ) from None


def list_metrics() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(_METRICS)


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

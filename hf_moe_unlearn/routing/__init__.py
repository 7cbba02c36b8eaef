"""Routing statistics: hooks on the routers, attribution of a dataset to experts, and expert selection."""

from .attribution import (
    attribute_experts,
    forget_concentration,
    select_explicit,
    select_seuf,
    select_trace,
    trace_scores,
)
from .recorder import RouterRecorder, RoutingOutput, expert_scores, parse_router_output
from .selection import ExpertSelection
from .stats import ExpertStats

__all__ = [
    "ExpertSelection",
    "ExpertStats",
    "RouterRecorder",
    "RoutingOutput",
    "attribute_experts",
    "expert_scores",
    "forget_concentration",
    "parse_router_output",
    "select_explicit",
    "select_seuf",
    "select_trace",
    "trace_scores",
]

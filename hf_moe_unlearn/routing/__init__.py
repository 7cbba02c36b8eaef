"""Routing statistics: hooks on the routers, attribution of a dataset to experts, and expert selection."""

from .attribution import (
    attribute_experts,
    concentration,
    forget_concentration,
    merge_selections,
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
    "concentration",
    "expert_scores",
    "forget_concentration",
    "merge_selections",
    "parse_router_output",
    "select_explicit",
    "select_seuf",
    "select_trace",
    "trace_scores",
]

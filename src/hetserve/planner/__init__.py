"""The planner: choose servers, pipelines, precision, roles and routing for a cluster (docs/planner.md)."""

from .search import Planner, PlanResult

__all__ = ["Planner", "PlanResult"]

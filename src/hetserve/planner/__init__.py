"""The planner: choose servers, pipelines, precision, roles and routing for a cluster (docs/planner.md)."""

from .candidate import PlanResult
from .search import Planner

__all__ = ["Planner", "PlanResult"]

"""Trace-driven discrete-event simulation of a plan (see docs/simulate.md)."""

from .simulator import SimResult, Simulator, simulate

__all__ = ["SimResult", "Simulator", "simulate"]

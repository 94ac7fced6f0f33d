"""Trace-driven discrete-event simulation of a plan (see docs/simulate.md)."""

from .simulator import OutOfTime, SimResult, Simulator, simulate

__all__ = ["OutOfTime", "SimResult", "Simulator", "simulate"]

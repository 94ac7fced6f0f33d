"""hetserve: plan, simulate and serve LLMs on heterogeneous GPU clusters."""

__version__ = "0.1.0"

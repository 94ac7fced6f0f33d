"""Serving a plan over worker processes: the topology of ranks, the driver (routing, dispatch, KV
hand-offs, recovery) and the workers."""

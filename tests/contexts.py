"""Strategy contexts for tests: a small workload, a cluster from node dicts, and a strategy's plan with
its deployment."""

from hetserve.baselines import StrategyContext, get_strategy
from hetserve.plan import Deployment
from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.models import load_model
from hetserve.specs.workloads import Workload, WorkloadFile

WORKLOAD = {
    "arrivals": {"kind": "poisson", "rate": 2.0},
    "prompt": {"kind": "lognormal", "mean": 600, "cv": 0.5, "max": 2000},
    "output": {"kind": "lognormal", "mean": 100, "cv": 0.5, "max": 400},
    "slo": {"ttft_ms": 3000, "tpot_ms": 150},
    "duration_s": 20,
}


def cluster(nodes, network=None):
    spec = {"name": "test", "nodes": nodes}
    if network:
        spec["network"] = network
    return Cluster(ClusterFile.model_validate(spec), source="test cluster")


def helix_machines(a100: int, l4: int, t4: int) -> list[dict]:
    """Nodes of Helix's machine mix: single-GPU A100-40GB, L4 and T4 machines."""
    return [
        {"name": name, "gpu": gpu, "count": 1, "replicas": n}
        for name, gpu, n in (("a100", "a100-40gb", a100), ("l4", "l4", l4), ("t4", "t4", t4))
    ]


def context(nodes, model="llama-3.1-8b", objective="goodput", workload=None, network=None, **kw):
    wl = Workload(WorkloadFile.model_validate(workload or WORKLOAD))
    kw.setdefault("time_limit", 4.0)
    return StrategyContext(cluster(nodes, network), load_model(model), wl, objective, **kw)


def plan_of(name, ctx):
    plan = get_strategy(name).plan(ctx)
    return plan, Deployment(plan, ctx.cluster, ctx.model, source=f"{name} plan")


def layer_counts(inst):
    return [s.plan.layers[1] - s.plan.layers[0] for s in inst.servers]

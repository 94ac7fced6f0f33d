import numpy as np
import pytest

from hetserve.plan import deployment_from_dict
from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.models import load_model
from hetserve.specs.workloads import SLO, Requests


def make_cluster(nodes, network=None, gpus=None):
    spec = {"nodes": nodes}
    if network:
        spec["network"] = network
    if gpus:
        spec["gpus"] = gpus
    return Cluster(ClusterFile.model_validate(spec), source="test-cluster")


def make_deployment(servers, instances, *, model="llama-2-7b", nodes=None, network=None, routing=None):
    cluster = make_cluster(nodes or [{"name": "n", "gpu": "a100-80gb", "count": 8}], network)
    plan = {"name": "test", "model": model, "cluster": "-", "servers": servers, "instances": instances}
    if routing:
        plan["routing"] = routing
    return deployment_from_dict(plan, cluster, load_model(model))


def requests(arrivals, prompts, outputs, hashes=None):
    a = np.asarray(arrivals, dtype=float)
    n = len(a)
    p = np.broadcast_to(np.asarray(prompts), (n,)).astype(np.int64)
    o = np.broadcast_to(np.asarray(outputs), (n,)).astype(np.int64)
    return Requests(a, p.copy(), o.copy(), hashes)


def poisson(rate, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1 / rate, n))


NO_SLO = SLO()


@pytest.fixture
def one_server():
    """Llama-2-7B on one A100 as one mixed instance serving one request at a time."""
    return make_deployment(
        [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 32]}],
        [{"name": "i", "role": "mixed", "chain": ["s"], "max_batch_size": 1}],
    )

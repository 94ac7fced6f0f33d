"""Devices that share a host's CPU cores (cluster ``hosts:``): a step is slowed while the running steps
ask for more cores than the host has, and never otherwise."""

import numpy as np
import pytest

from hetserve.plan import deployment_from_dict
from hetserve.sim import simulate
from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.models import load_model
from tests.sim.conftest import NO_SLO, requests

MODEL = "llama-2-7b"


def _deployment(servers, instances, cores: int | None):
    node = {"name": "n", "gpu": "l4", "count": 4}
    spec = {"nodes": [node]}
    if cores is not None:
        node["host"] = "box"
        spec["hosts"] = [{"name": "box", "cores": cores, "threads_per_device": 1}]
    cluster = Cluster(ClusterFile.model_validate(spec), source="test-cluster")
    plan = {"name": "t", "model": MODEL, "cluster": "-", "servers": servers, "instances": instances}
    return deployment_from_dict(plan, cluster, load_model(MODEL))


def _replicas(cores):
    servers = [{"name": f"s{k}", "node": "n", "gpus": [k], "layers": [0, 32]} for k in range(2)]
    instances = [
        {"name": f"i{k}", "role": "mixed", "chain": [f"s{k}"], "max_batch_size": 1} for k in range(2)
    ]
    return _deployment(servers, instances, cores)


def _pipeline(cores, lanes=1):
    servers = [
        {"name": f"s{k}", "node": "n", "gpus": [k], "layers": [16 * k, 16 * (k + 1)]} for k in range(2)
    ]
    inst = {"name": "i", "role": "mixed", "chain": ["s0", "s1"], "micro_batches": lanes, "max_batch_size": 4}
    return _deployment(servers, [inst], cores)


def test_two_busy_devices_on_one_core_take_twice_as_long():
    reqs = requests(np.zeros(2), 256, 1)  # one prefill on each replica, at the same time
    own = simulate(_replicas(None), reqs, NO_SLO).records.finish
    one_core = simulate(_replicas(1), reqs, NO_SLO).records.finish
    two_cores = simulate(_replicas(2), reqs, NO_SLO).records.finish
    assert two_cores == pytest.approx(own, rel=1e-9)
    assert one_core == pytest.approx(2 * own, rel=1e-9)


def test_a_device_busy_alone_is_not_slowed():
    """A lone request through a two-stage pipeline on one core: its stages never run at once, and the
    stage-by-stage timing of a hosted chain gives the same times as a chain of its own devices."""
    reqs = requests([0.0], 300, 20)
    own = simulate(_pipeline(None), reqs, NO_SLO).records
    hosted = simulate(_pipeline(1), reqs, NO_SLO).records
    assert hosted.first_token[0] == pytest.approx(own.first_token[0], rel=1e-9)
    assert hosted.finish[0] == pytest.approx(own.finish[0], rel=1e-9)


def test_lanes_in_flight_on_too_few_cores_are_slower_than_on_enough():
    reqs = requests(np.zeros(2), 300, 40)  # two lanes through both stages at once
    own = simulate(_pipeline(None, lanes=2), reqs, NO_SLO).records.finish
    enough = simulate(_pipeline(2, lanes=2), reqs, NO_SLO).records.finish
    short = simulate(_pipeline(1, lanes=2), reqs, NO_SLO).records.finish
    assert enough == pytest.approx(own, rel=0.02)
    assert np.all(short > 1.2 * enough)

"""Building a plan from an allocation: where each instance's stages go."""


def test_a_chain_never_comes_back_to_a_node_it_left(write):
    """Stages go on the previous stage's node while it has room, else on a node the chain has not used:
    a 3-stage pipeline over two 4-GPU nodes is not placed l4-0 -> l4-1 -> l4-0."""
    from types import SimpleNamespace

    from hetserve.planner.allocate import Allocation
    from hetserve.planner.build import place
    from hetserve.planner.pools import pools_of
    from hetserve.specs.clusters import Cluster

    cluster = Cluster.load(
        write(
            "c.yaml",
            "name: c\nnodes:\n  - {name: l4, gpu: l4, count: 4, replicas: 2}\nnetwork: {gbit_per_s: 100}\n",
        )
    )
    (pool,) = pools_of(cluster)
    chain = SimpleNamespace(name="pipe", stages=[SimpleNamespace(pool=pool, tp=1)] * 3)
    wide = SimpleNamespace(name="wide", stages=[SimpleNamespace(pool=pool, tp=2)] * 3)
    for t, instances in ((chain, 2), (wide, 1)):
        placed = place(cluster, [t], Allocation({0: instances}, {}, 1.0, 1.0, 0.0, 1.0))
        for _, spots in placed:
            nodes = [node for node, _ in spots]
            runs = [n for i, n in enumerate(nodes) if i == 0 or nodes[i - 1] != n]
            assert len(runs) == len(set(runs)), nodes

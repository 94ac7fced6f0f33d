import pytest
from pydantic import ValidationError

from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.gpus import builtin_gpus

REQUIRED = [
    "h200",
    "h100-sxm",
    "h100-pcie",
    "h20",
    "a100-80gb",
    "a100-40gb",
    "l40s",
    "l40",
    "rtx-a6000",
    "a10g",
    "a10",
    "l4",
    "t4",
    "v100-16gb",
    "v100-32gb",
    "rtx-4090",
    "rtx-3090",
    "mi300x",
    "mi250-gcd",
    "mi210",
    "ascend-910b",
    "gaudi2",
]


def test_catalogue_covers_required_gpus_with_sources():
    gpus = builtin_gpus()
    for name in REQUIRED:
        g = gpus[name]
        for field in ("memory_gb", "memory_bw_gb_per_s", "tflops", "fabric", "tdp_w", "price_per_hour"):
            assert g.sources.get(field), f"{name}.{field} has no source"


def test_catalogue_flops_are_dense():
    g = builtin_gpus()
    # dense 16-bit tensor peaks from the datasheets (the sparsity figures are twice these)
    assert g["h100-sxm"].tflops["bf16"] == pytest.approx(989, rel=0.01)
    assert g["a100-80gb"].tflops["bf16"] == pytest.approx(312, rel=0.01)
    assert g["l4"].tflops["fp16"] == pytest.approx(121, rel=0.02)
    assert "fp8" not in g["a100-80gb"].tflops and "bf16" not in g["v100-16gb"].tflops
    assert g["mi300x"].vendor == "amd" and g["ascend-910b"].vendor == "huawei"


def test_mi250_is_one_gcd():
    g = builtin_gpus()["mi250-gcd"]
    assert g.memory_gb == 64  # half of the 128 GB package


def _cluster(text, write):
    return Cluster.load(write("c.yaml", text))


def test_links_prefer_pair_then_zone_then_default(write):
    c = _cluster(
        """
nodes:
  - {name: a, gpu: a100-80gb, count: 8, zone: east}
  - {name: b, gpu: l4, count: 2, zone: west, replicas: 2}
network:
  gbit_per_s: 100
  latency_ms: 0.1
  zones: [{a: east, b: west, gbit_per_s: 8, latency_ms: 30}]
  pairs: [{a: a, b: b-1, gbit_per_s: 80, latency_ms: 1}]
""",
        write,
    )
    assert set(c.nodes) == {"a", "b-0", "b-1"} and c.total_gpus == 12
    assert c.link("a", "b-0").bandwidth == pytest.approx(1e9) and c.link("a", "b-0").latency == pytest.approx(
        0.03
    )
    assert c.link("b-1", "a").bandwidth == pytest.approx(10e9)
    assert c.link("b-0", "b-1").bandwidth == pytest.approx(12.5e9)
    intra = c.link("a", "a")
    assert intra.bandwidth == pytest.approx(builtin_gpus()["a100-80gb"].fabric.gb_per_s * 1e9)


def test_cluster_overrides_and_adds_gpus(write):
    c = _cluster(
        """
gpus:
  l4: {price_per_hour: 0.5}
  l4-capped: {base: l4, tdp_w: 60}
nodes:
  - {name: a, gpu: l4, count: 4}
  - {name: b, gpu: l4-capped, count: 4}
""",
        write,
    )
    assert c.gpus["l4"].price_per_hour == 0.5
    assert "cluster file" in c.gpus["l4"].sources["price_per_hour"]
    assert c.gpus["l4-capped"].tdp_w == 60 and c.gpus["l4-capped"].memory_gb == 24
    assert c.gpus["l4-capped"].price_per_hour == 0.5  # 'base' starts from the cluster's own l4
    assert c.price_per_hour() == pytest.approx(8 * 0.5)
    assert builtin_gpus()["l4"].price_per_hour != 0.5  # the catalogue itself is untouched


def test_a_complete_new_gpu_is_accepted(write):
    c = _cluster(
        """
gpus:
  my-npu:
    vendor: other
    memory_gb: 32
    memory_bw_gb_per_s: 800
    tflops: {fp16: 200}
    fabric: {kind: pcie, gb_per_s: 32}
    tdp_w: 250
    price_per_hour: 1.0
    weight_dtypes: [fp16]
    kv_dtypes: [fp16]
nodes: [{name: n, gpu: my-npu, count: 2}]
""",
        write,
    )
    assert c.gpus["my-npu"].half_tflops == 200


def test_cluster_schema_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="netwrok"):
        ClusterFile.model_validate({"nodes": [{"name": "a", "gpu": "t4"}], "netwrok": {}})


def test_nodes_name_the_host_whose_cores_their_devices_share(write):
    c = _cluster(
        """
hosts: [{name: lab, cores: 2, threads_per_device: 1}]
nodes:
  - {name: cpu, gpu: l4, count: 3, host: lab, replicas: 2}
  - {name: gpu, gpu: a100-80gb, count: 8}
""",
        write,
    )
    assert c.nodes["cpu-0"].host.name == "lab" and c.nodes["cpu-1"].host.cores == 2
    assert c.nodes["gpu"].host is None


@pytest.mark.parametrize(
    "hosts, host, message",
    [
        (
            "[{name: lab, cores: 2}]",
            "lap",
            "nodes[0].host: unknown host 'lap' (did you mean 'lab'?); known: lab",
        ),
        ("[]", "lab", "nodes[0].host: unknown host 'lab'; list it under 'hosts:'"),
        ("[{name: lab, cores: 2}, {name: lab, cores: 4}]", "lab", "hosts[1].name: host 'lab' appears twice"),
    ],
)
def test_a_wrong_host_is_named_with_its_fix(write, hosts, host, message):
    import re

    from hetserve.errors import HetserveError

    with pytest.raises(HetserveError, match=re.escape(message)):
        _cluster(f"hosts: {hosts}\nnodes:\n  - {{name: a, gpu: l4, host: {host}}}\n", write)

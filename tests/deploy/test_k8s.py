import pytest
import yaml

from ..conftest import EXAMPLES
from .util import PLANS, exported


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_manifests_parse(path, engine):
    out, refused = exported(path, "k8s", engine)
    if refused:
        assert "on Kubernetes cannot express instance '" in refused
    docs = [d for d in yaml.safe_load_all(out.files["manifests.yaml"]) if d]
    kinds = [d["kind"] for d in docs]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for a in out.asks:
        name = a.name.lower()
        assert ("Service", name) in by_name
        if a.multi_node:
            lws = by_name[("LeaderWorkerSet", name)]
            assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
            tmpl = lws["spec"]["leaderWorkerTemplate"]
            assert tmpl["size"] == len(a.nodes)
            pods = [tmpl["leaderTemplate"], tmpl["workerTemplate"]]
            want = [len(a.gpus_on(a.head)), len(a.gpus_on(a.nodes[1]))]
        else:
            dep = by_name[("Deployment", name)]
            pods = [dep["spec"]["template"]]
            sel = pods[0]["spec"]["nodeSelector"]
            assert sel["hetserve.io/node"] == a.head and sel["hetserve.io/gpu"] == a.stages[0].gpu.name
            want = [sum(s.tp for s in a.stages)]
        resource = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}[a.vendor]
        for pod, n in zip(pods, want):
            (c,) = pod["spec"]["containers"]
            assert c["resources"]["limits"] == {resource: n}
            assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in c["env"]}
    assert set(kinds) <= {"Deployment", "LeaderWorkerSet", "Service"}


def test_amd_gpus_and_engine_args():
    out, refused = exported(EXAMPLES / "plans" / "cross-vendor-pd.yaml", "k8s", "vllm")
    assert "cross-vendor P/D" in refused
    docs = list(yaml.safe_load_all(out.files["manifests.yaml"]))
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    (c,) = deps["decode-a"]["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == {"amd.com/gpu": 2}
    assert c["command"] == ["vllm"] and c["args"][0] == "serve"
    assert "cross-vendor P/D" in out.files["README.md"]


def test_sglang_lws_ranks():
    out, _ = exported(EXAMPLES / "plans" / "bench-32gpu.yaml", "k8s", "sglang")
    docs = list(yaml.safe_load_all(out.files["manifests.yaml"]))
    (lws,) = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["args"]
    assert worker[worker.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
    assert worker[worker.index("--dist-init-addr") + 1].startswith("$(LWS_LEADER_ADDRESS):")
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-router") for d in docs)

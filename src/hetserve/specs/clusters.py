"""Cluster specs: nodes of GPUs, each node's fabric, and the network between nodes.

A cluster file (YAML)::

    name: mixed-dc
    include: [this-cpu.yaml]   # optional: devices measured by `hetserve profile`
    gpus:                      # optional: add GPUs or override catalogued fields
      h100-sxm: {price_per_hour: 3.50, calibration: h100-vllm.yaml}
    nodes:
      - {name: h100, gpu: h100-sxm, count: 8, zone: east}
      - {name: t4, gpu: t4, count: 4, zone: west, replicas: 3}   # t4-0, t4-1, t4-2
      - {name: cpu, gpu: this-cpu, count: 2, host: lab}          # two workers on lab's cores
    hosts:                     # optional: devices that are worker processes on one machine's cores
      - {name: lab, cores: 2, threads_per_device: 1}
    network:
      gbit_per_s: 100          # default between nodes
      latency_ms: 0.1
      zones:  [{a: east, b: west, gbit_per_s: 1, latency_ms: 40}]
      pairs:  [{a: h100, b: t4-0, gbit_per_s: 400, latency_ms: 0.02}]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import Field, model_validator

from ..errors import HetserveError, allowed, suggest
from .gpus import Fabric, GPUOverride, GPUSpec, Strict, builtin_gpus
from .loading import list_mistakes, load_yaml_model, validate

#: Most nodes a cluster may have, counting every replica (a node's ``replicas`` included).
MAX_NODES = 10_000
#: Most GPUs on one node.
MAX_GPUS_PER_NODE = 64
#: Bounds of a network link: bandwidth in Gbit/s and one-way latency in ms.
MIN_GBIT_PER_S, MAX_GBIT_PER_S = 0.001, 1e6
MAX_LATENCY_MS = 10_000.0
#: Most device files one cluster file includes.
MAX_INCLUDES = 64


@dataclass(frozen=True)
class Link:
    """A point-to-point path: bandwidth in bytes/s (per direction) and one-way latency in seconds."""

    bandwidth: float
    latency: float

    def transfer_time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


class NodeSpec(Strict):
    name: str = Field(min_length=1)
    gpu: str
    count: int = Field(default=1, ge=1, le=MAX_GPUS_PER_NODE)
    zone: str = "default"
    fabric: Fabric | None = Field(default=None, description="override the GPU's intra-node fabric")
    replicas: int = Field(
        default=1, ge=1, le=MAX_NODES, description="identical nodes named NAME-0 .. NAME-(N-1)"
    )
    host: str | None = Field(
        default=None, description="a host under `hosts:` whose CPU cores this node's devices share"
    )


class HostSpec(Strict):
    """A machine whose CPU cores several devices share: each device is a worker process that computes
    with ``threads_per_device`` cores (``hetserve serve --threads``) while it runs a step. When its
    devices ask for more cores than it has, every step on it slows in proportion (the simulator's
    processor sharing, docs/simulate.md). GPUs do not share their compute this way: a cluster of GPUs
    names no hosts."""

    name: str = Field(min_length=1)
    cores: int = Field(ge=1, le=4096, description="CPU cores the host's devices share")
    threads_per_device: int = Field(default=1, ge=1, le=4096, description="cores a busy device uses")


class LinkOverride(Strict):
    a: str
    b: str
    gbit_per_s: float = Field(ge=MIN_GBIT_PER_S, le=MAX_GBIT_PER_S)
    latency_ms: float = Field(default=0.0, ge=0, le=MAX_LATENCY_MS)


class NetworkSpec(Strict):
    gbit_per_s: float = Field(
        default=100.0,
        ge=MIN_GBIT_PER_S,
        le=MAX_GBIT_PER_S,
        description="default inter-node bandwidth, Gbit/s",
    )
    latency_ms: float = Field(
        default=0.05, ge=0, le=MAX_LATENCY_MS, description="default inter-node one-way latency"
    )
    zones: list[LinkOverride] = []
    pairs: list[LinkOverride] = []


class ClusterFile(Strict):
    name: str = "cluster"
    include: list[str] = Field(
        default=[],
        max_length=MAX_INCLUDES,
        description="device files written by `hetserve profile`, relative to the cluster file",
    )
    gpus: dict[str, GPUOverride] = {}
    nodes: list[NodeSpec] = Field(min_length=1)
    hosts: list[HostSpec] = []
    network: NetworkSpec = NetworkSpec()

    @model_validator(mode="after")
    def _node_count(self) -> ClusterFile:
        total = sum(n.replicas for n in self.nodes)
        if total > MAX_NODES:
            raise ValueError(
                f"the cluster has {total:,} nodes (replicas counted), more than the {MAX_NODES:,} "
                "a cluster may have"
            )
        return self


@dataclass(frozen=True)
class Node:
    name: str
    gpu: GPUSpec
    count: int
    zone: str
    fabric: Fabric
    host: HostSpec | None = None  # the machine whose cores the node's devices share (CPU devices)

    @property
    def intra_link(self) -> Link:
        return Link(self.fabric.gb_per_s * 1e9, self.fabric.latency_us * 1e-6)


class Cluster:
    """A validated cluster: nodes with resolved GPU specs and a link between any two nodes."""

    def __init__(self, spec: ClusterFile, source: str | None = None, calibration: str | Path | None = None):
        self.spec = spec
        self.name = spec.name
        self.source = source
        self.gpus = resolve_gpus(spec.gpus, source, spec.include)
        self.calibration = str(calibration) if calibration else None
        if calibration:
            from .calibration import apply_calibration, load_calibration

            used = {n.gpu for n in spec.nodes if n.gpu in self.gpus}
            self.gpus = apply_calibration(self.gpus, load_calibration(calibration), str(calibration), used)
        nodes: list[Node] = []
        mistakes: list[str] = []  # every mistake in the file, reported together
        listed = False  # the known GPU names are listed once
        hosts: dict[str, HostSpec] = {}
        for j, h in enumerate(spec.hosts):
            if h.name in hosts:
                mistakes.append(f"hosts[{j}].name: host '{h.name}' appears twice; names must be unique")
            hosts[h.name] = h
        for i, n in enumerate(spec.nodes):
            if n.host is not None and n.host not in hosts:
                known = f"; known: {allowed(hosts)}" if hosts else "; list it under 'hosts:'"
                mistakes.append(f"nodes[{i}].host: unknown host '{n.host}'{suggest(n.host, hosts)}{known}")
            if n.gpu not in self.gpus:
                known = "" if listed else f"; known: {allowed(self.gpus)} (or define it under 'gpus:')"
                listed = True
                mistakes.append(f"nodes[{i}].gpu: unknown GPU '{n.gpu}'{suggest(n.gpu, self.gpus)}{known}")
                continue
            gpu = self.gpus[n.gpu]
            names = [n.name] if n.replicas == 1 else [f"{n.name}-{r}" for r in range(n.replicas)]
            host = hosts.get(n.host)
            for name in names:
                nodes.append(Node(name, gpu, n.count, n.zone, n.fabric or gpu.fabric, host))
        seen: set[str] = set()
        for node in nodes:
            if node.name in seen:
                mistakes.append(f"nodes: node name '{node.name}' appears twice; names must be unique")
            seen.add(node.name)
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        zones = {n.zone for n in nodes}
        net = spec.network
        for kind, entries, known in (("zones", net.zones, zones), ("pairs", net.pairs, set(self.nodes))):
            for j, o in enumerate(entries):
                for end in ("a", "b"):
                    value = getattr(o, end)
                    if value not in known:
                        what = "zone" if kind == "zones" else "node"
                        mistakes.append(
                            f"network.{kind}[{j}].{end}: unknown {what} '{value}'"
                            f"{suggest(value, known)}; known: {allowed(known)}"
                        )
        if mistakes:
            raise HetserveError(list_mistakes(mistakes), source=source)
        self._zone_links = {frozenset((o.a, o.b)): o for o in net.zones}
        self._pair_links = {frozenset((o.a, o.b)): o for o in net.pairs}

    @classmethod
    def load(cls, path: str | Path, calibration: str | Path | None = None) -> Cluster:
        """The cluster in ``path``; ``calibration``: a calibration file whose factors replace the
        defaults of the GPU types it covers."""
        spec = load_yaml_model(ClusterFile, path, "cluster file")
        return cls(spec, source=str(path), calibration=calibration)

    @cached_property
    def total_gpus(self) -> int:
        return sum(n.count for n in self.nodes.values())

    def gpu_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes.values():
            out[n.gpu.name] = out.get(n.gpu.name, 0) + n.count
        return out

    def link(self, a: str, b: str) -> Link:
        """The path between nodes ``a`` and ``b`` (the node's fabric when a == b)."""
        if a == b:
            return self.nodes[a].intra_link
        o = self._pair_links.get(frozenset((a, b)))
        if o is None:
            za, zb = self.nodes[a].zone, self.nodes[b].zone
            o = self._zone_links.get(frozenset((za, zb)))
        if o is None:
            net = self.spec.network
            return Link(net.gbit_per_s * 1e9 / 8, net.latency_ms * 1e-3)
        return Link(o.gbit_per_s * 1e9 / 8, o.latency_ms * 1e-3)

    def price_per_hour(self) -> float:
        return sum(n.gpu.price_per_hour * n.count for n in self.nodes.values())

    def summary(self) -> dict:
        return {
            "name": self.name,
            "nodes": len(self.nodes),
            "gpus": self.total_gpus,
            "by_type": self.gpu_counts(),
            "price_per_hour": round(self.price_per_hour(), 2),
        }


def _relative(path: str, source: str | None) -> Path:
    """``path`` as written in a cluster file: relative to that file when it is one."""
    p = Path(path)
    if p.is_absolute() or source is None or not Path(source).is_file():
        return p
    return Path(source).parent / p


def resolve_gpus(
    overrides: dict[str, GPUOverride], source: str | None = None, include: list[str] = ()
) -> dict[str, GPUSpec]:
    """The catalogue with a cluster file's included devices, additions and overrides applied."""
    from .calibration import apply_calibration, load_calibration, load_device

    gpus = dict(builtin_gpus())
    for i, entry in enumerate(include):
        device = load_device(_relative(entry, source), f"include[{i}]", source)
        gpus[device.name] = device
    for name, o in overrides.items():
        base_name = o.base or name
        changes = o.model_dump(exclude_none=True, exclude={"base", "calibration"})
        if base_name in gpus:
            merged = gpus[base_name].model_dump()
            merged.update(changes)
            merged["name"] = name
            if "sources" not in changes:
                merged["sources"] = {**merged["sources"], **{k: f"cluster file {source}" for k in changes}}
        else:
            if o.base:
                raise HetserveError(
                    f"gpus.{name}.base: unknown GPU '{o.base}'{suggest(o.base, gpus)}", source=source
                )
            if name not in gpus and not _is_complete(changes):
                raise HetserveError(
                    f"gpus.{name}: '{name}' is not in the catalogue{suggest(name, gpus)}; a new GPU needs "
                    "vendor, memory_gb, memory_bw_gb_per_s, tflops, fabric, tdp_w, price_per_hour, "
                    "weight_dtypes and kv_dtypes (or 'base: <catalogued gpu>')",
                    source=source,
                )
            merged = {"name": name, "sources": {k: f"cluster file {source}" for k in changes}, **changes}
        gpus[name] = validate(GPUSpec, merged, source, prefix=f"gpus.{name}")
        if o.calibration:
            path = _relative(o.calibration, source)
            try:
                calibration = load_calibration(path)
            except HetserveError as exc:
                raise HetserveError(f"gpus.{name}.calibration: {exc}", source=source) from None
            gpus.update(apply_calibration(gpus, calibration, str(path), {name}))
    return gpus


def _is_complete(fields: dict) -> bool:
    need = {
        "vendor",
        "memory_gb",
        "memory_bw_gb_per_s",
        "tflops",
        "fabric",
        "tdp_w",
        "price_per_hour",
        "weight_dtypes",
        "kv_dtypes",
    }
    return need <= set(fields)

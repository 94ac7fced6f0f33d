"""The files ``hetserve compare --out`` writes: the report as JSON, every strategy's plan, and plots (the
objective per strategy, latency CDFs, cost against throughput)."""

from __future__ import annotations

import json
from pathlib import Path


def write_comparison(out: Path, report: dict, sims: dict, plans: dict) -> list[str]:
    """Write ``compare.json``, each strategy's plan (and an inline cluster beside them) and the plots;
    the paths written."""
    import yaml

    from ..plan import save_plan

    out.mkdir(parents=True, exist_ok=True)
    files = []
    plan_dir = out / "plans"
    plan_dir.mkdir(exist_ok=True)
    for name, (plan, ctx) in plans.items():
        cluster_file = Path(ctx.cluster_ref)
        if not cluster_file.exists():  # an inline cluster: write it beside the plans
            cluster_file = plan_dir / Path(ctx.cluster_ref).name
            cluster_file.write_text(
                yaml.safe_dump(
                    ctx.cluster.spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False
                )
            )
        path = plan_dir / f"{name}.yaml"
        save_plan(plan, path, cluster_path=cluster_file)
        files.append(str(path))
    path = out / "compare.json"
    path.write_text(json.dumps(report, indent=2, default=_json_default))
    files.append(str(path))
    files += [str(p) for p in _plots(out, report, sims) if p]
    return files


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


#: One colour per strategy in every comparison plot (tab10 hues; hetserve red, its quantised row pink).
STRATEGY_COLOURS = {
    "hetserve": "#d62728",
    "hetserve-q": "#e377c2",
    "homogeneous": "#7f7f7f",
    "uniform": "#bcbd22",
    "hexgen": "#1f77b4",
    "llm-pq": "#ff7f0e",
    "splitwise": "#2ca02c",
    "pd-hetero": "#9467bd",
    "helix": "#8c564b",
    "petals": "#17becf",
    "chain": "#393b79",
}


def strategy_colour(name: str) -> str:
    return STRATEGY_COLOURS.get(name, "#555555")


def _plots(out: Path, report: dict, sims: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        return []
    from ..sim.plots import cdf_panels
    from ..specs.workloads import SLO

    res = report["strategies"]
    names = list(res)
    colours = {n: strategy_colour(n) for n in names}
    paths = []
    # objective per strategy
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    vals = [res[n].get("objective_value") or 0.0 for n in names]
    ax.bar(names, vals, color=[colours[n] for n in names])
    ax.set_ylabel(
        f"{report['objective']}: {report['objective_label']} "
        f"({report['objective_unit']}, {report['objective_sense']})"
    )
    ax.set_title(f"{report['scenario']}: objective per strategy (0 = infeasible or failed)")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = out / "objective.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # latency CDFs, the SLO's targets marked
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    slo = SLO(**report["slo"]) if report.get("slo") else None
    cdf_panels(axes, {n: r.records for n, r in sims.items()}, slo, colours, log=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle(f"{report['scenario']}: latency at {report['offered_rps']:.3g} req/s offered")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    p = out / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # cost vs the objective: a legend names the points (labels beside them overlap when points are close)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in sims:
        r = res[name]
        if r.get("objective_value") is None:
            continue
        ax.scatter(
            r["cost_per_hour"],
            r["objective_value"],
            s=70 if name.startswith("hetserve") else 40,
            color=colours[name],
            label=name,
            edgecolors="black",
            linewidths=0.5,
        )
    ax.set_xlabel("cost ($/hour)")
    ax.set_ylabel(f"{report['objective']} ({report['objective_unit']}, {report['objective_sense']})")
    ax.set_title(f"{report['scenario']}: cost vs {report['objective']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out / "cost_objective.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# ---- the command line --------------------------------------------------------------------------------------

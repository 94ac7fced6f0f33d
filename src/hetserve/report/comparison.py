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


def _plots(out: Path, report: dict, sims: dict) -> list[Path]:
    import numpy as np

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        return []
    res = report["strategies"]
    names = list(res)
    paths = []
    # objective per strategy
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    vals = [res[n].get("objective_value") or 0.0 for n in names]
    colors = [
        "tab:red" if n == "hetserve" else ("tab:blue" if n == report["baseline"] else "tab:gray")
        for n in names
    ]
    ax.bar(names, vals, color=colors)
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
    # latency CDFs
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, result in sims.items():
        rec = result.records
        done = rec.completed
        for ax, values in zip(axes, (rec.ttft()[done], rec.tpot()[done] * 1e3, rec.e2e()[done])):
            v = np.sort(values[~np.isnan(values)])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name, lw=2 if name == "hetserve" else 1)
    for ax, label in zip(axes, ("TTFT (s)", "TPOT (ms)", "end-to-end (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['scenario']}: latency at {report['offered_rps']:.3g} req/s offered")
    fig.tight_layout()
    p = out / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # cost vs throughput
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in sims:
        r = res[name]
        ax.scatter(r["cost_per_hour"], r["throughput_tok_s"], s=60 if name == "hetserve" else 30)
        ax.annotate(
            name,
            (r["cost_per_hour"], r["throughput_tok_s"]),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("cost ($/hour)")
    ax.set_ylabel("throughput (output tok/s)")
    ax.set_title(f"{report['scenario']}: cost vs throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out / "cost_throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# ---- the command line --------------------------------------------------------------------------------------

"""PNG plots of a simulation: latency CDFs and server utilisation over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return plt


def latency_cdfs(records, path: Path, title: str = "") -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    done = records.completed
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (label, values) in zip(
        axes,
        (
            ("TTFT (s)", records.ttft()[done]),
            ("TPOT (ms)", records.tpot()[done] * 1e3),
            ("end-to-end (s)", records.e2e()[done]),
        ),
    ):
        v = np.sort(values[~np.isnan(values)])
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def utilisation(servers: dict, bin_width: float, path: Path, title: str = "") -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, srv in servers.items():
        if not srv.bins:
            continue
        t = (np.arange(len(srv.bins)) + 0.5) * bin_width
        ax.plot(t, np.minimum(np.asarray(srv.bins) / bin_width, 1.0), label=name, lw=1)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("utilisation")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if len(servers) <= 16:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""PNG plots of a simulation: latency CDFs (with the SLO targets marked) and server utilisation over time
(lines for a few servers, a heat map for many). ``cdf_panels`` also draws ``hetserve compare``'s CDFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: At most this many servers are drawn as lines with a legend; more are a heat map, one row per server.
MAX_UTILISATION_LINES = 8
#: The CDF panels: title, how a record's values are read (seconds -> the panel's unit) and the SLO field.
CDF_PANELS = (
    ("TTFT (s)", lambda r: r.ttft(), 1.0, "ttft_ms"),
    ("TPOT (ms)", lambda r: r.tpot() * 1e3, 1e3, "tpot_ms"),
    ("end-to-end (s)", lambda r: r.e2e(), 1.0, "e2e_ms"),
)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return plt


def legible_log_axis(ax) -> None:
    """A log x axis labelled at powers of ten (and 2 and 5 times them) in plain numbers, with no minor
    labels to collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def cdf_panels(axes, series: dict, slo=None, colours: dict | None = None, log: bool = False) -> None:
    """One CDF per named ``Records`` in ``series`` on each of the three ``axes`` (TTFT, TPOT, E2E), the SLO's
    target as a dashed line where it sets one. ``colours``: name -> colour (default: matplotlib's cycle)."""
    for name, records in series.items():
        done = records.completed
        for ax, (_, values, _, _) in zip(axes, CDF_PANELS):
            v = values(records)[done]
            v = np.sort(v[~np.isnan(v)])
            if len(v):
                kw = {"color": colours[name]} if colours and name in colours else {}
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name, lw=1.5, **kw)
    for ax, (label, _, scale, field) in zip(axes, CDF_PANELS):
        target = getattr(slo, field, None) if slo is not None else None
        if target is not None:
            x = target / 1e3 * scale
            q = slo.percentile / 100
            ax.axvline(x, color="black", ls="--", lw=1, label=f"SLO: p{slo.percentile:g} <= {x:g}")
            ax.axhline(q, color="black", ls=":", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        if log:
            legible_log_axis(ax)
        ax.grid(alpha=0.3)


def latency_cdfs(records, path: Path, title: str = "", slo=None) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    cdf_panels(axes, {"requests": records}, slo)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def utilisation(servers: dict, bin_width: float, path: Path, title: str = "") -> Path | None:
    """Utilisation over time: one labelled line per server for up to ``MAX_UTILISATION_LINES`` servers;
    beyond, a heat map (a row per server, busiest first, colour = share of the bin busy)."""
    plt = _pyplot()
    if plt is None:
        return None
    series = {
        name: np.minimum(np.asarray(srv.bins) / bin_width, 1.0) for name, srv in servers.items() if srv.bins
    }
    if len(series) <= MAX_UTILISATION_LINES:
        fig, ax = plt.subplots(figsize=(10, 4))
        for name, u in series.items():
            t = (np.arange(len(u)) + 0.5) * bin_width
            ax.plot(t, u, label=f"{name} (mean {u.mean():.0%})", lw=1)
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("utilisation (share of time busy)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        names = sorted(series, key=lambda n: -series[n].mean())
        width = max(len(u) for u in series.values())
        grid = np.zeros((len(names), width))
        for row, n in enumerate(names):
            grid[row, : len(series[n])] = series[n]
        fig, ax = plt.subplots(figsize=(11, max(3.5, 0.22 * len(names) + 1.5)))
        im = ax.imshow(
            grid,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0,
            vmax=1,
            extent=(0, width * bin_width, len(names) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([f"{n} ({series[n].mean():.0%})" for n in names], fontsize=7)
        ax.set_xlabel("simulated time (s)")
        fig.colorbar(im, ax=ax, label="utilisation (share of time busy)")
    ax.set_title(
        title + (" (servers, busiest first; mean in brackets)" if len(series) > MAX_UTILISATION_LINES else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""A picture of a plan: the nodes and their GPUs with the servers on them (layer range, TP, weight bits,
role), the instances as chains of servers with their routing share, and the KV hand-offs from prefill to
decode instances. One layout (``layout``), drawn two ways: a self-contained HTML page with an inline SVG
that opens offline (``write_html``) and a PNG through matplotlib (``write_png``)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .planning import server_bits

if TYPE_CHECKING:
    from ..plan import Deployment

#: One colour per role, everywhere a plan is drawn (colour-blind-safe Okabe-Ito hues).
ROLE_COLOURS = {"prefill": "#0072B2", "decode": "#E69F00", "mixed": "#009E73", "shared": "#CC79A7"}
UNUSED = "#E8E8E8"
INK = "#222222"

#: Layout sizes in pixels (the PNG uses the same units at 100 pixels per inch).
MARGIN = 16
ROW = 34
NODE_LABEL = 230
GPU_CELL = 96
CHAIN_BOX = 190
CHAIN_GAP = 30
TITLE = 30
SECTION = 28
#: Most nodes drawn one per row; more nodes without servers are summarised in one line.
MAX_IDLE_NODES = 6


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    fill: str
    label: str
    tooltip: str = ""
    text_colour: str = "white"


@dataclass(frozen=True)
class Arrow:
    x1: float
    y1: float
    x2: float
    y2: float
    colour: str = INK
    label: str = ""


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    size: float = 12
    bold: bool = False
    colour: str = INK


@dataclass
class Picture:
    width: float
    height: float
    title: str
    boxes: list[Box] = field(default_factory=list)
    arrows: list[Arrow] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)


def _bits(bits) -> str:
    return f"{server_bits(bits)}-bit"


def server_roles(dep: Deployment) -> dict[str, str]:
    """Each server's role colour key: its instances' role, or 'shared' when instances of several roles
    use it."""
    roles: dict[str, set[str]] = {}
    for inst in dep.instances.values():
        for srv in inst.servers:
            roles.setdefault(srv.name, set()).add(inst.role)
    return {name: (next(iter(r)) if len(r) == 1 else "shared") for name, r in roles.items()}


def layout(dep: Deployment) -> Picture:
    """Where every box, arrow and label of ``dep``'s picture goes."""
    spec = dep.spec
    roles = server_roles(dep)
    cost = dep.cost_per_hour()
    title = (
        f"{spec.name}: {dep.model.name} on {dep.cluster.name}, {dep.gpus_used()} GPUs, ${cost:,.2f}/h, "
        f"{len(dep.instances)} instance{'s' if len(dep.instances) != 1 else ''}"
    )
    pic = Picture(0, 0, title)
    y = MARGIN + TITLE
    pic.texts.append(Text(MARGIN, MARGIN + 18, title, 16, True))
    # ---- nodes and the servers on their GPUs ----
    pic.texts.append(Text(MARGIN, y + 18, "Nodes: each GPU, and the server (layers, bits) on it", 13, True))
    y += SECTION
    by_node: dict[str, list] = {}
    for srv in dep.servers.values():
        by_node.setdefault(srv.node.name, []).append(srv)
    nodes = list(dep.cluster.nodes.values())
    idle = [n for n in nodes if n.name not in by_node]
    shown = [n for n in nodes if n.name in by_node] + idle[:MAX_IDLE_NODES]
    width = MARGIN * 2 + NODE_LABEL
    for node in shown:
        zone = f", {node.zone}" if getattr(node, "zone", None) else ""
        pic.texts.append(Text(MARGIN, y + ROW / 2 + 4, f"{node.name} ({node.gpu.name}{zone})", 12))
        for g in range(node.count):
            pic.boxes.append(
                Box(MARGIN + NODE_LABEL + g * GPU_CELL, y, GPU_CELL - 4, ROW - 6, UNUSED, "", f"GPU {g}", INK)
            )
        for srv in by_node.get(node.name, []):
            gpus = sorted(srv.plan.gpus)
            x0 = MARGIN + NODE_LABEL + gpus[0] * GPU_CELL
            w = (gpus[-1] - gpus[0] + 1) * GPU_CELL - 4
            a, b = srv.plan.layers
            tp = (
                (f"EP{srv.plan.tp} " if srv.plan.expert_parallel else f"TP{srv.plan.tp} ")
                if srv.plan.tp > 1
                else ""
            )
            pic.boxes.append(
                Box(
                    x0,
                    y,
                    w,
                    ROW - 6,
                    ROLE_COLOURS[roles.get(srv.name, "shared")],
                    f"{tp}L{a}-{b - 1} {_bits(srv.plan.bits)}",
                    f"server {srv.name}: GPUs {gpus} of {node.name}, layers {a}-{b - 1}, "
                    f"{_bits(srv.plan.bits)} weights, role {roles.get(srv.name, 'unused')}",
                )
            )
        width = max(width, MARGIN * 2 + NODE_LABEL + node.count * GPU_CELL)
        y += ROW
    if len(idle) > MAX_IDLE_NODES:
        more = len(idle) - MAX_IDLE_NODES
        pic.texts.append(Text(MARGIN, y + 16, f"... and {more} more nodes without servers", 12))
        y += ROW
    # ---- instances as chains of servers ----
    y += ROW / 2
    pic.texts.append(
        Text(
            MARGIN,
            y + 18,
            "Instances: each a chain of servers, first layer to last; share of requests",
            13,
            True,
        )
    )
    y += SECTION
    weights = _routing_shares(dep)
    inst_y: dict[str, float] = {}
    for inst in dep.instances.values():
        colour = ROLE_COLOURS[inst.role]
        share = weights.get(inst.name)
        label = f"{inst.name} ({inst.role})" + (f", {share:.0%} of requests" if share is not None else "")
        pic.texts.append(Text(MARGIN, y + ROW / 2 + 4, label[:44], 12))
        x = MARGIN + NODE_LABEL + 60
        inst_y[inst.name] = y + (ROW - 6) / 2
        for k, srv in enumerate(inst.servers):
            a, b = srv.plan.layers
            pic.boxes.append(
                Box(
                    x,
                    y,
                    CHAIN_BOX,
                    ROW - 6,
                    colour,
                    f"{srv.node.name} x{srv.plan.tp} L{a}-{b - 1}",
                    f"{inst.name} stage {k}: server {srv.name} on {srv.node.name} ({srv.plan.tp} x "
                    f"{srv.node.gpu.name}), layers {a}-{b - 1}, {_bits(srv.plan.bits)}",
                )
            )
            if k:
                pic.arrows.append(Arrow(x - CHAIN_GAP + 2, y + (ROW - 6) / 2, x - 2, y + (ROW - 6) / 2))
            x += CHAIN_BOX + CHAIN_GAP
        width = max(width, x + MARGIN)
        y += ROW
    # ---- KV hand-offs ----
    handoffs = _handoffs(dep)
    if handoffs:
        y += ROW / 2
        pic.texts.append(
            Text(MARGIN, y + 18, "KV hand-offs: prefill instance -> decode instance, share", 13, True)
        )
        y += SECTION
        for p, d, share in handoffs:
            pic.texts.append(
                Text(
                    MARGIN,
                    y + ROW / 2 + 4,
                    f"{p} -> {d}" + (f": {share:.0%}" if share is not None else ""),
                    12,
                )
            )
            y += ROW * 0.7
    # ---- legend ----
    y += ROW / 2
    x = MARGIN
    for role, colour in ROLE_COLOURS.items():
        words = {"mixed": "mixed (both phases)", "shared": "shared by several roles"}.get(role, role)
        pic.boxes.append(Box(x, y, 18, 18, colour, "", role))
        pic.texts.append(Text(x + 24, y + 14, words, 12))
        x += 40 + 8 * len(words)
    pic.width, pic.height = max(width, x + MARGIN), y + 18 + MARGIN
    return pic


def _routing_shares(dep: Deployment) -> dict[str, float]:
    """Share of requests per entry instance under weighted routing (empty for other policies)."""
    r = dep.spec.routing
    if r.policy != "weighted" or not r.weights:
        return {}
    total = sum(r.weights.values())
    return {k: w / total for k, w in r.weights.items()} if total > 0 else {}


def _handoffs(dep: Deployment) -> list[tuple[str, str, float | None]]:
    """(prefill, decode, share) for every hand-off the plan allows: its weights, or every pair (share
    None) when the decode instance is chosen by the hand-off policy."""
    r = dep.spec.routing
    pre = [i.name for i in dep.instances.values() if i.role == "prefill"]
    dec = [i.name for i in dep.instances.values() if i.role == "decode"]
    out: list[tuple[str, str, float | None]] = []
    for p in pre:
        ws = r.handoff_weights.get(p)
        if ws:
            total = sum(ws.values()) or 1.0
            out += [(p, d, w / total) for d, w in ws.items() if w > 0]
        else:
            out += [(p, f"any of {len(dec)} decode instances ({r.handoff})", None)] if dec else []
    return out


def _svg(pic: Picture) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{pic.width:.0f}" height="{pic.height:.0f}" '
        f'viewBox="0 0 {pic.width:.0f} {pic.height:.0f}" font-family="sans-serif" role="img" '
        f'aria-label="{html.escape(pic.title)}">',
        '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
        f'<path d="M0,0 L8,4 L0,8 z" fill="{INK}"/></marker></defs>',
        f'<rect width="{pic.width:.0f}" height="{pic.height:.0f}" fill="white"/>',
    ]
    for b in pic.boxes:
        tip = f"<title>{html.escape(b.tooltip)}</title>" if b.tooltip else ""
        parts.append(
            f'<g class="box"><rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="4" '
            f'fill="{b.fill}" stroke="#555" stroke-width="0.5"/>{tip}'
            + (
                f'<text x="{b.x + b.w / 2:.1f}" y="{b.y + b.h / 2 + 4:.1f}" font-size="11" '
                f'text-anchor="middle" fill="{b.text_colour}">{html.escape(b.label)}</text>'
                if b.label
                else ""
            )
            + "</g>"
        )
    for a in pic.arrows:
        parts.append(
            f'<line x1="{a.x1:.1f}" y1="{a.y1:.1f}" x2="{a.x2:.1f}" y2="{a.y2:.1f}" stroke="{a.colour}" '
            'stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
    for t in pic.texts:
        weight = ' font-weight="bold"' if t.bold else ""
        parts.append(
            f'<text x="{t.x:.1f}" y="{t.y:.1f}" font-size="{t.size:g}"{weight} fill="{t.colour}">'
            f"{html.escape(t.text)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def write_html(dep: Deployment, path: str | Path, notes: str = "") -> Path:
    """The plan's picture as one HTML page (inline SVG, no scripts or downloads), with its notes."""
    pic = layout(dep)
    path = Path(path)
    body = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(pic.title)}</title>",
        "<style>body{font-family:sans-serif;margin:16px;color:#222} li{margin:4px 0}</style>",
        "</head><body>",
        f"<h1>{html.escape(dep.spec.name)}</h1>",
        _svg(pic),
    ]
    if notes:
        body.append("<h2>Why this plan</h2><ul>")
        body += [f"<li>{html.escape(n)}</li>" for n in _sentences(notes)]
        body.append("</ul>")
    body.append("</body></html>")
    path.write_text("\n".join(body), encoding="utf-8")
    return path


def _sentences(notes: str) -> list[str]:
    out, start = [], 0
    for i in range(len(notes) - 1):
        if notes[i] == "." and notes[i + 1] == " " and (i + 2 < len(notes) and notes[i + 2].isupper()):
            out.append(notes[start : i + 1].strip())
            start = i + 2
    tail = notes[start:].strip()
    return out + ([tail] if tail else [])


def write_png(dep: Deployment, path: str | Path) -> Path:
    """The plan's picture as a PNG (matplotlib, the same layout as the HTML page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    pic = layout(dep)
    dpi = 100
    fig = plt.figure(figsize=(pic.width / dpi, pic.height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, pic.width)
    ax.set_ylim(pic.height, 0)
    ax.axis("off")
    pt = 72 / dpi  # font sizes are in pixels in the layout, points in matplotlib
    for b in pic.boxes:
        ax.add_patch(
            FancyBboxPatch(
                (b.x, b.y), b.w, b.h, boxstyle="round,pad=0,rounding_size=4", fc=b.fill, ec="#555", lw=0.5
            )
        )
        if b.label:
            ax.text(
                b.x + b.w / 2,
                b.y + b.h / 2,
                b.label,
                ha="center",
                va="center",
                fontsize=11 * pt,
                color=b.text_colour,
            )
    for a in pic.arrows:
        ax.annotate(
            "", xy=(a.x2, a.y2), xytext=(a.x1, a.y1), arrowprops=dict(arrowstyle="->", color=a.colour)
        )
    for t in pic.texts:
        ax.text(
            t.x, t.y, t.text, fontsize=t.size * pt, fontweight="bold" if t.bold else "normal", color=t.colour
        )
    path = Path(path)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)
    return path


def draw_plan(dep: Deployment, out: str | Path, notes: str = "") -> list[Path]:
    """``out``.png and ``out``.html (``out`` without its suffix); the files written."""
    base = Path(out)
    base = base.with_suffix("") if base.suffix in (".png", ".html", ".yaml", ".yml") else base
    return [write_png(dep, base.with_suffix(".png")), write_html(dep, base.with_suffix(".html"), notes)]

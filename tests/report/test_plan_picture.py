"""The picture of a plan: every example plan drawn as PNG and HTML, every instance and server on it, and
the HTML page rendered by a real browser (headless Chromium) without a network."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hetserve.plan import load_plan
from hetserve.report.plan_picture import ROLE_COLOURS, layout

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLANS = sorted((EXAMPLES / "plans").glob("*.yaml")) + sorted((EXAMPLES / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_every_instance_and_server_is_drawn(path):
    dep = load_plan(path)
    pic = layout(dep)
    labels = " ".join(t.text for t in pic.texts)
    for inst in dep.instances.values():
        assert inst.name in labels
        stages = [b for b in pic.boxes if b.tooltip.startswith(f"{inst.name} stage ")]
        assert len(stages) == len(inst.servers)
        assert {b.fill for b in stages} == {ROLE_COLOURS[inst.role]}
    for srv in dep.servers.values():
        a, b = srv.plan.layers
        assert any(
            x.tooltip.startswith(f"server {srv.name}:") and f"L{a}-{b - 1}" in x.label for x in pic.boxes
        )
    # nothing overlaps: boxes of one row do not cross each other
    rows: dict[float, list] = {}
    for box in pic.boxes:
        rows.setdefault(box.y, []).append(box)
    for boxes in rows.values():
        spans = sorted((b.x, b.x + b.w) for b in boxes if b.label)
        assert all(e <= s2 + 1e-6 for (_, e), (s2, _) in zip(spans, spans[1:]))


def test_show_writes_png_and_html_beside_the_plan(run_cli, tmp_path):
    plan = tmp_path / "pd.yaml"
    src = EXAMPLES / "plans" / "cross-vendor-pd.yaml"
    text = src.read_text().replace("cluster: ../clusters/", f"cluster: {EXAMPLES / 'clusters'}/")
    plan.write_text(text)
    code, out, err = run_cli("show", plan)
    assert code == 0, err
    png, page = tmp_path / "pd.png", tmp_path / "pd.html"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 600
    assert (np.abs(img[..., :3] - 1).sum(axis=-1) > 0.1).mean() > 0.02  # drawn, not blank
    html = page.read_text()
    assert "<svg" in html and "prefill-a" in html and "decode-d" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch
    code, out, err = run_cli("show", plan, "--out", tmp_path / "x.txt")
    assert code == 2 and ".png or .html" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt install chromium)")
def test_the_html_page_renders_in_headless_chromium(run_cli, tmp_path):
    plan = EXAMPLES / "plans" / "petals-chains.yaml"
    page = tmp_path / "p.html"
    assert run_cli("show", plan, "--out", page)[0] == 0
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert "<svg" in dom and "chain-a (mixed)" in dom and "L27-53" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,700", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    colours = {
        tuple((img[y, x, :3] * 255).round().astype(int))
        for y in range(0, img.shape[0], 7)
        for x in range(0, img.shape[1], 7)
    }
    mixed = tuple(int(ROLE_COLOURS["mixed"][i : i + 2], 16) for i in (1, 3, 5))
    assert any(sum(abs(c - m) for c, m in zip(col, mixed)) < 30 for col in colours), "no instance drawn"

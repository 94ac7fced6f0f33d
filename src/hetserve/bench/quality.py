"""Model quality under weight quantisation: perplexity on a fixed paragraph at 16, 8 and 4 bits.

    hetserve quality [--model smollm2-135m] [--group-size 64] [--threads 1] [--json]
    hetserve quality --sensitivity [MODEL] --out FILE      # per layer: each layer alone at 8 and 4 bits

Perplexity is exp(mean negative log-likelihood) of every token of ``PERPLEXITY_TEXT`` given the ones
before it, computed with one forward pass over the paged-KV model (the engine's own code path).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence

from ..errors import HetserveError

#: A fixed English paragraph (written for hetserve) to measure perplexity on.
PERPLEXITY_TEXT = """\
The mill at the bend of the river was built in the spring of 1784, when the village decided that \
carrying grain to the market town two days away was no longer worth the trouble. The miller's family \
kept a ledger from the first week, and it tells a plain story. In good years the wheel turned from \
March until the first hard frost, grinding wheat, barley and a little rye for the farms on both banks. \
In dry summers the water fell so low that the wheel stopped for weeks, and the farmers waited with \
their sacks stacked in the yard, arguing about the weather and the price of bread.

The machinery itself was simple. Water ran down a narrow wooden channel and struck the paddles of the \
wheel, which turned a long oak shaft. Inside the mill, a set of wooden gears changed the slow turning \
of the shaft into the fast turning of the upper millstone. Grain poured from a hopper into a hole at \
the centre of the stone, was crushed between the two faces, and came out at the edge as flour. The \
miller adjusted the gap between the stones by hand, listening to the sound they made: a low, even hum \
meant fine flour, while a rattle meant the stones were too far apart.

Over the next century the mill changed hands four times. A new iron wheel replaced the wooden one in \
1851, and a second pair of stones was added so that two kinds of flour could be ground at once. When \
the railway reached the valley, large steam mills in the cities began to sell flour more cheaply than \
any village mill could, and the business slowly declined. The last sack was ground in 1923. Today the \
building is a small museum. Children who visit are allowed to turn a handle that lifts the sluice gate, \
and they watch, delighted, as the water rushes in and the old wheel creaks back to life for a few \
minutes, just as it did for the farmers who waited in the yard more than two hundred years ago.
"""


def perplexity(model, token_ids: Sequence[int], block_size: int = 16) -> float:
    """exp(mean NLL) of ``token_ids[1:]`` given their prefixes, in one prefill pass of ``model``."""
    import torch
    import torch.nn.functional as F

    from ..runtime.model_runner import ModelRunner
    from ..scheduling import ScheduledSeq
    from ..scheduling import Sequence as Seq

    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    num_blocks = -(-len(ids) // block_size)
    runner = ModelRunner(model, num_blocks, block_size)
    seq = Seq(0, len(ids), 1, token_ids=ids)
    seq.block_table = list(range(num_blocks))
    x, positions, meta, _ = runner.prepare([ScheduledSeq(seq, 0, len(ids), True, True)])
    with torch.inference_mode():
        hidden = model(x, positions, meta, runner.kv_caches)
        logits = model.compute_logits(hidden[:-1])
        nll = F.cross_entropy(logits, torch.tensor(ids[1:], device=logits.device))
    return math.exp(nll.item())


def quantisation_report(
    model: str = "smollm2-135m",
    bits: Sequence[int] = (16, 8, 4),
    group_size: int = 64,
    text: str = PERPLEXITY_TEXT,
) -> list[dict]:
    """Perplexity, projection-weight bytes and the change against 16 bits, one row per bit-width.

    16 bits means the model's own dtype (fp32 here). Each setting loads the model afresh.
    """
    from ..runtime.model.source import load_model
    from ..runtime.quant import linear_weight_bytes, quantize_model

    rows: list[dict] = []
    base = None
    for b in bits:
        net, tokenizer = load_model(model)
        ids = tokenizer.encode(text)
        if b != 16:
            quantize_model(net, b, group_size)
        start = time.perf_counter()
        ppl = perplexity(net, ids)
        row = {
            "bits": b,
            "group_size": group_size if b != 16 else None,
            "tokens": len(ids),
            "perplexity": ppl,
            "linear_weight_mb": linear_weight_bytes(net) / 2**20,
            "seconds": time.perf_counter() - start,
        }
        base = base or row
        row["perplexity_change_pct"] = (ppl / base["perplexity"] - 1) * 100
        row["weight_fraction"] = row["linear_weight_mb"] / base["linear_weight_mb"]
        rows.append(row)
    return rows


def layer_sensitivity(
    model: str = "smollm2-135m",
    bits: Sequence[int] = (8, 4),
    group_size: int = 64,
    layers: Sequence[int] | None = None,
    text: str = PERPLEXITY_TEXT,
    progress=None,
) -> dict:
    """Perplexity change (percent) of quantising each decoder layer alone to each of ``bits``, every other
    layer at the model's own precision: the fields of a sensitivity file (specs/sensitivity.py) when
    ``layers`` is None (every layer); ``progress(done, total)`` is called after each measurement."""
    from ..runtime.model.source import load_model
    from ..runtime.quant import quantize_layer, restore_layer

    net, tokenizer = load_model(model)
    ids = tokenizer.encode(text)
    base = perplexity(net, ids)
    chosen = list(range(len(net.layers))) if layers is None else list(layers)
    change: dict[int, list[float]] = {b: [] for b in bits}
    total, done = len(chosen) * len(bits), 0
    for index in chosen:
        for b in bits:
            originals = quantize_layer(net.layers[index], b, group_size)
            try:
                change[b].append((perplexity(net, ids) / base - 1) * 100)
            finally:
                restore_layer(originals)
            done += 1
            if progress is not None:
                progress(done, total)
    return {
        "model": model,
        "num_layers": len(net.layers),
        "tokens": len(ids),
        "group_size": group_size,
        "base_perplexity": base,
        "change_pct": change,
        "source": f"hetserve quality --sensitivity {model} --group-size {group_size} (each layer alone, "
        "the engine's own int8/int4 weights, perplexity on the fixed paragraph)",
    }


def add_quality_parser(sub) -> argparse.ArgumentParser:
    q = sub.add_parser("quality", help="perplexity change of int8/int4 weight quantisation on a fixed text")
    q.add_argument(
        "--model", default="smollm2-135m", help="GGUF file, Hugging Face directory or smollm2-135m"
    )
    q.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[16, 8, 4],
        choices=[16, 8, 4],
        help="settings to measure (16 = the model's own dtype; the first is the reference)",
    )
    q.add_argument("--group-size", type=int, default=64, choices=[64, 128])
    q.add_argument(
        "--sensitivity",
        nargs="?",
        const="",
        metavar="MODEL",
        help="measure each layer alone at 8 and 4 bits (MODEL, default --model) and write a sensitivity "
        "file for 'plan --sensitivity' (needs --out)",
    )
    q.add_argument("--out", metavar="FILE", help="where --sensitivity writes its file (YAML)")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quality)
    return q


def cmd_quality(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.sensitivity is not None:
        return _write_sensitivity(args.sensitivity or args.model, args)
    if args.out:
        raise HetserveError("quality: --out is where --sensitivity writes; add --sensitivity")
    rows = quantisation_report(args.model, bits=args.bits, group_size=args.group_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"perplexity of {args.model} on the fixed paragraph ({rows[0]['tokens']} tokens), group {args.group_size}"
    )
    print(f"{'weights':>8} {'perplexity':>11} {'change':>8} {'projection MB':>14} {'vs first':>10}")
    for r in rows:
        name = "model" if r["bits"] == 16 else f"int{r['bits']}"
        print(
            f"{name:>8} {r['perplexity']:11.3f} {r['perplexity_change_pct']:+7.2f}% {r['linear_weight_mb']:14.1f} "
            f"{r['weight_fraction']:9.3f}x"
        )
    return 0


def _write_sensitivity(model: str, args) -> int:
    import sys

    from ..calibration.cli import write_yaml
    from ..specs.sensitivity import SensitivityFile

    if not args.out:
        raise HetserveError("quality --sensitivity: give --out FILE, where the sensitivity file is written")

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() and not args.json:
            print(
                f"\rmeasured {done}/{total} layer settings", end="" if done < total else "\n", file=sys.stderr
            )

    fields = layer_sensitivity(model, group_size=args.group_size, progress=progress)
    sens = SensitivityFile.model_validate(fields)
    write_yaml(sens.model_dump(mode="json"), args.out, "hetserve layer sensitivity", "docs/planner.md")
    if args.json:
        print(json.dumps(sens.model_dump(mode="json"), indent=2))
        return 0
    ranked = sorted(range(sens.num_layers), key=lambda i: -sens.change_pct[4][i])
    print(
        f"{model}: perplexity {sens.base_perplexity:.2f} on {sens.tokens} tokens; one layer at a time, "
        f"change at 8 bits {min(sens.change_pct[8]):+.2f}%..{max(sens.change_pct[8]):+.2f}%, at 4 bits "
        f"{min(sens.change_pct[4]):+.2f}%..{max(sens.change_pct[4]):+.2f}%"
    )
    print(
        "most sensitive layers (4 bits): "
        + ", ".join(f"{i} ({sens.change_pct[4][i]:+.2f}%)" for i in ranked[:5])
    )
    print(f"wrote {args.out}; use it with: hetserve plan ... --sensitivity {args.out}")
    return 0

"""Cost-model fidelity: the roofline backend's per-layer predictions against published measurements.

    python benchmarks/costmodel_fidelity.py [--profile PATH] [--by-machine]

PATH defaults to ../shared/reference/helix_layer_profiles.csv beside the repository (Helix, ASPLOS'25,
vLLM per-layer profiles of Llama-2-70B and LLaMA-30B on A100-40GB, L4, T4 and V100-16GB).
Prints median and worst absolute percentage error per GPU and phase, with the default factors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hetserve.costmodel.fidelity import DECODE_CONTEXT, PREFILL_PROMPT, compare, summarise
from hetserve.specs.gpus import builtin_gpus

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "helix_layer_profiles.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(DEFAULT))
    ap.add_argument("--by-machine", action="store_true", help="also break down by model and machine")
    args = ap.parse_args()
    points = compare(args.profile, builtin_gpus())
    print(
        f"{len(points)} measurements; assumptions: prefill prompts of {PREFILL_PROMPT} tokens, "
        f"decode context {DECODE_CONTEXT} tokens"
    )
    print(f"{'gpu':<11} {'phase':<8} {'n':>4} {'median APE %':>13} {'worst APE %':>12}")
    for (gpu, phase), s in summarise(points).items():
        print(f"{gpu:<11} {phase:<8} {s['n']:>4} {s['median_ape']:>13.1f} {s['worst_ape']:>12.1f}")
    if args.by_machine:
        print()
        for (model, machine, phase), s in summarise(
            points, key=lambda p: (p.model, p.machine, p.phase)
        ).items():
            print(
                f"{model:<12} {machine:<6} {phase:<8} {s['n']:>4} {s['median_ape']:>8.1f} {s['worst_ape']:>8.1f}"
            )


if __name__ == "__main__":
    main()

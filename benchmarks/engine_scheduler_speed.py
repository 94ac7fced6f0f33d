"""Cost of the shared scheduler per step with count-only sequences, as the simulator drives it.

    python benchmarks/engine_scheduler_speed.py [--requests 5000] [--prefix-keys]

Requests arrive in bursts; each step is schedule() + postprocess() with no model. Prints steps/s and
microseconds per step and per scheduled sequence.
"""

from __future__ import annotations

import argparse
import random
import time

from hetserve.scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--blocks", type=int, default=20000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--prefix-keys", action="store_true", help="give requests shared 512-token prefix keys")
    args = ap.parse_args()
    rng = random.Random(0)
    scheduler = Scheduler(
        SchedulerConfig(max_batch_size=256, max_batch_tokens=4096, chunk_size=args.chunk),
        BlockManager(args.blocks, args.block_size),
    )
    pending = []
    for i in range(args.requests):
        prompt = rng.randint(50, 4000)
        keys = None
        if args.prefix_keys:
            shared = rng.randint(0, 3)
            keys = [shared * 1000 + j for j in range(-(-prompt // 512))]
        pending.append(
            Sequence(i, prompt, rng.randint(10, 400), block_keys=keys, block_key_tokens=512 if keys else None)
        )
    pending.reverse()
    steps = scheduled = 0
    start = time.perf_counter()
    while pending or scheduler.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                scheduler.add(pending.pop())
        batch = scheduler.schedule()
        scheduler.postprocess(batch)
        steps += 1
        scheduled += len(batch)
    elapsed = time.perf_counter() - start
    s = scheduler.stats
    print(
        f"{steps} steps in {elapsed:.2f} s: {steps / elapsed:,.0f} steps/s, {elapsed / steps * 1e6:.0f} us/step, "
        f"{elapsed / scheduled * 1e6:.2f} us per scheduled sequence"
    )
    print(
        f"prefill tokens {s.prefill_tokens:,}, decode tokens {s.decode_tokens:,}, prefix hits "
        f"{s.prefix_hit_tokens:,}, preemptions {s.preemptions}"
    )


if __name__ == "__main__":
    main()

"""Per-step cost of EAGER's dynamic threshold against the number of entropies a prompt has seen.

    python scripts/bench_eager_threshold.py                       # n = 1k, 10k, 100k, 300k
    python scripts/bench_eager_threshold.py --seen 1000,10000 --steps 50

One step of the threshold = record this step's entropies (``--rows`` sequences of one prompt) and read
the 99th percentile for the next step. Two ways, at each n entropies already seen:

* list (before): append to a Python list, ``torch.quantile(torch.tensor(seen), 0.99)`` (O(n) per step,
  the old ``algos.rollout.eager._effective_theta`` path);
* histogram (now): ``algos.rollout.quantile.RunningQuantile`` add + quantile (4096 bins over [0, ln K]).

Prints the median microseconds per step over ``--steps`` steps and the largest difference between the
two percentiles. The target (issue 17): the histogram's cost flat in n.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from algos.device import add_device_arguments, resolve_device  # noqa: E402
from algos.rollout.quantile import RunningQuantile  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seen", default="1000,10000,100000,300000", help="entropies seen before the timed steps")
    p.add_argument("--steps", type=int, default=30, help="timed steps at each n (median reported)")
    p.add_argument("--rows", type=int, default=8, help="sequences of the prompt: entropies added per step")
    p.add_argument("--top_k", type=int, default=20, help="K of the top-K entropy: values lie in [0, ln K]")
    p.add_argument("--bins", type=int, default=4096, help="histogram bins")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_device_arguments(p)  # the histogram's device; --dtype is accepted and unused (entropies are float32)
    args = p.parse_args(argv)
    args.seen_list = [int(x) for x in args.seen.split(",") if x.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    high = math.log(args.top_k)
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"[bench_eager_threshold] {args.rows} entropies per step, {args.steps} steps per n, {args.bins} bins over "
          f"[0, ln {args.top_k}], histogram on {device}, {args.threads} thread(s)")
    print(f"{'n seen':>9} {'list us/step':>13} {'histogram us/step':>18} {'max |diff| nats':>16}")
    flat = []
    for n in args.seen_list:
        history = (torch.rand(n, generator=g) ** 2 * high).tolist()
        new = (torch.rand(args.steps, args.rows, generator=g) ** 2 * high)
        seen = list(history)
        sketch = RunningQuantile(1, 0.0, high, args.bins, device=device)
        sketch.add(torch.zeros(n, dtype=torch.long, device=device), torch.tensor(history, device=device))
        group = torch.zeros(args.rows, dtype=torch.long, device=device)
        list_times, hist_times, worst = [], [], 0.0
        for step in range(args.steps):
            values = new[step]
            start = time.perf_counter()
            seen.extend(values.tolist())
            exact = float(torch.quantile(torch.tensor(seen), 0.99))
            list_times.append(time.perf_counter() - start)
            on_device = values.to(device)
            sync()
            start = time.perf_counter()
            sketch.add(group, on_device)
            estimate = float(sketch.quantile(0.99)[0])  # the float() waits for the device, as the decoder's use does
            hist_times.append(time.perf_counter() - start)
            worst = max(worst, abs(estimate - exact))
        lt, ht = 1e6 * statistics.median(list_times), 1e6 * statistics.median(hist_times)
        flat.append(ht)
        print(f"{n:>9} {lt:>13.1f} {ht:>18.1f} {worst:>16.5f}")
    print(f"histogram cost, largest / smallest n: {flat[-1] / flat[0]:.2f}x (flat: about 1x); "
          f"bin width {high / args.bins:.5f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())

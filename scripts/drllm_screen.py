"""Screen skip sets for Dr.LLM's candidate search: greedy accuracy with blocks skipped (each single by default).

    python scripts/drllm_screen.py --model_name_or_path smollm2-135m-thinking --dataset thinking \
        --num_problems 32 --max_new_tokens 320 --threads 2

Every path (dense, then the dense path without block b for each b, or the --skip_sets given) is
generated greedily on the same search-split problems (``train/drllm_router.py``'s split, so
held-out problems are never looked at) in full batches (routers/candidate_search.py). Prints one
line per path: accuracy, problems lost and gained against dense, seconds; and a --candidate_skips
string for ``train/drllm_router.py --search candidates``: the --top single skips that lose least,
their pairs not screened yet, and the screened multi-block sets (--skip_sets "3,27;6,27") that keep
at least half the dense answers. Writes the rows to --out as JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from train.cli import _OneLineParser

    p = _OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model_name_or_path", default=None, help="HF hub id or local path; default: the embedded SmolLM2-135M-Instruct")
    a("--dataset", default="thinking", help="'thinking' or 'arithmetic' (the search split of train/drllm_router.py)")
    a("--num_problems", type=int, default=32, help="search-split problems per path")
    a("--skip_sets", default=None, help="paths to screen as skip sets ('3;5;3,5'); default: every single block")
    a("--max_new_tokens", type=int, default=320, help="greedy tokens per answer")
    a("--batch_size", type=int, default=16, help="problems per generation batch")
    a("--top", type=int, default=3, help="single skips (fewest lost) that make the suggested candidates")
    a("--seed", type=int, default=0, help="data seed (as train/drllm_router.py --seed)")
    a("--threads", type=int, default=None, help="torch CPU threads")
    a("--out", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    if args.num_problems < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or args.top < 1:
        p.error("--num_problems, --max_new_tokens, --batch_size and --top must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    from algos.data import DEFAULT_PROMPT_TEMPLATE, build_prompt
    from algos.models import load_causal_lm, load_model_config, load_tokenizer
    from routers.candidate_search import parse_skip_sets, path_correctness, skip_path
    from routers.routed_model import RoutedModel
    from train.drllm_router import load_splits, parse_args as router_args

    if args.threads:
        torch.set_num_threads(args.threads)
    split_args = router_args(["--dataset", args.dataset, "--num_search_examples", str(max(args.num_problems, 2)),
                              "--num_eval_samples", "0", "--seed", str(args.seed)])
    records = load_splits(split_args)[0][:args.num_problems]
    blocks = load_model_config(args.model_name_or_path).num_hidden_layers
    sets = parse_skip_sets(args.skip_sets, blocks) if args.skip_sets else None  # bad sets: one line, before the load
    tokenizer = load_tokenizer(args.model_name_or_path)
    routed = RoutedModel(load_causal_lm(args.model_name_or_path, dtype=torch.float32).eval())
    L = routed.num_layers
    prompts = [build_prompt(tokenizer, r["question"], DEFAULT_PROMPT_TEMPLATE) for r in records]
    golds = [str(r["answer"]) for r in records]
    sets = sets or [(b,) for b in range(L)]
    rows, dense_ok = [], None
    for skips in [()] + sets:
        start = time.perf_counter()
        ok, lengths = path_correctness(routed, tokenizer, prompts, golds, skip_path(skips, L), args.max_new_tokens,
                                       batch_size=args.batch_size)
        dense_ok = ok if dense_ok is None else dense_ok
        row = {"skips": list(skips), "accuracy": sum(ok) / len(ok), "correct": ok,
               "lost": sum(d and not o for d, o in zip(dense_ok, ok)),
               "gained": sum(o and not d for d, o in zip(dense_ok, ok)),
               "mean_tokens": sum(lengths) / len(lengths), "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(f"skip {','.join(map(str, skips)) or 'none (dense)':>12}: accuracy {row['accuracy']:.3f}  lost "
              f"{row['lost']:2d}  gained {row['gained']:2d}  {row['mean_tokens']:.0f} tokens  {row['seconds']:.0f} s",
              flush=True)
    suggestion = suggest_candidates(rows, args.top, L)
    print(f"suggested: --search candidates --candidate_skips '{suggestion}'" if suggestion
          else "suggested: none (no screened set keeps half the dense answers)")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"model": args.model_name_or_path, "problems": len(records), "rows": rows,
                       "suggested_candidate_skips": suggestion}, f, indent=1)
        os.replace(tmp, args.out)
    return rows


def suggest_candidates(rows: list[dict], top: int, num_layers: int) -> str:
    """A --candidate_skips string from screened rows (rows[0] is dense): the ``top`` single skips that
    lose least (lost - gained), their pairs not screened yet, and the screened multi-block sets that keep
    at least half the dense answers, fewest net lost first."""
    def net(r):
        return r["lost"] - r["gained"], r["lost"]

    screened = {tuple(r["skips"]) for r in rows}
    best = [r["skips"][0] for r in sorted((r for r in rows[1:] if len(r["skips"]) == 1), key=net)[:top]]
    untried = [p for p in itertools.combinations(sorted(best), 2) if p not in screened] if num_layers > 2 else []
    dense_right = sum(rows[0]["correct"])
    kept = [tuple(r["skips"]) for r in sorted((r for r in rows[1:] if len(r["skips"]) > 1), key=net)
            if 2 * sum(r["correct"]) >= dense_right]
    return ";".join([str(b) for b in best] + [",".join(map(str, s)) for s in untried + kept])


if __name__ == "__main__":
    from routers.traces import TraceError
    from train.cli import main_guard

    main_guard(main, errors=(TraceError,))

"""Dr.LLM layer router: MCTS path search -> router training -> held-out evaluation -> export.

    python train/drllm_router.py --model_name_or_path runs/grpo/final
    python train/drllm_router.py --num_search_examples 24 --simulations 12 --num_eval_samples 40

1. search: MCTS (UCT, c = 1.8, lambda = 3.0) per training example; traces appended to
   ``<output_dir>/traces.jsonl`` as they are found (a rerun with the same settings resumes);
2. train: frozen base, teacher forcing along each target path, focal loss with class weights
   from the label counts, AdamW + cosine schedule; per-block accuracy and macro-F1 on a held-out
   part of the traces;
3. eval: greedy accuracy on held-out problems with the router deciding once per sequence at
   prefill vs the dense model, and mean blocks executed vs L;
4. export: ``<output_dir>/router/`` (safetensors + JSON with the base model's identity),
   ``<output_dir>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algos.device import add_device_arguments  # noqa: E402
from train.cli import _OneLineParser, _parse_bool, main_guard  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineParser(prog="drllm_router.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model_name_or_path", default=None, help="HF hub id or local path; default: the embedded SmolLM2-135M-Instruct")
    a("--output_dir", default="runs/drllm", help="traces.jsonl, router/ and summary.json go here")
    a("--dataset", default="arithmetic", help="'arithmetic', 'thinking' (multi-step problems for thinking models), "
                                              "'gsm8k', an HF hub name or a local .jsonl/.json/.parquet")
    a("--question_column", default="question", help="question column of an HF/local dataset")
    a("--answer_column", default="answer", help="answer column of an HF/local dataset")
    a("--arithmetic_digits", type=int, default=2, help="digits per operand of the arithmetic task")
    a("--arithmetic_operands", type=int, default=2, help="operands per arithmetic problem")
    a("--arithmetic_operators", default="+", help="operators drawn from '+-*'")
    a("--num_search_examples", type=int, default=32,
      help="training problems searched by MCTS (arithmetic: train split; others: the first N records)")
    a("--num_eval_samples", type=int, default=40,
      help="held-out problems for routed vs unrouted accuracy (arithmetic: test split; others: the last N "
           "records); 0 skips the evaluation")
    a("--prompt_template", default=None, help="prompt with a {question} field; default: algos.data's template")
    a("--require_boxed", type=_parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
      help="an answer counts only inside \\boxed{}")
    a("--max_new_tokens", type=int, default=None,
      help="greedy tokens per path evaluation and per eval answer; default 15 (the paper's, for short answers), "
           f"{THINKING_EVAL_TOKENS} for a thinking model (</think>), which must think before it answers")
    a("--verify_draft", type=_parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
      help="evaluate a path by checking the dense completion in one teacher-forced forward and decoding only from "
           "the first disagreement (the same greedy output up to float ties; routers/path_eval.py)")
    a("--path_length_factor", type=float, default=2.0,
      help="a path's greedy evaluation stops after max(32, factor x the dense completion's length) new tokens "
           "(within --max_new_tokens); 0 = no bound")
    a("--path_reward", choices=["generation", "agreement"], default="generation",
      help="a path's MCTS reward: 'generation' = its greedy answer is correct (the paper's); 'agreement' = one "
           "teacher-forced forward keeps >= --min_agreement of the dense completion's tokens and all of its answer "
           "(for thinking models; base errors are not searched)")
    a("--min_agreement", type=float, default=0.95, help="--path_reward agreement: the share of tokens to keep")
    a("--search", choices=["mcts", "candidates"], default="mcts",
      help="'mcts' = the paper's UCT search per example; 'candidates' = the dense path and the --candidate_skips "
           "paths, each generated on every search problem in full batches (the exact reward at batch speed; "
           "routers/candidate_search.py)")
    a("--candidate_skips", default=None,
      help="--search candidates: skip sets separated by ';', blocks by ',' (e.g. '3;5;3,5'); "
           "scripts/drllm_screen.py measures each single skip to choose them")
    a("--simulations", type=int, default=50, help="MCTS simulations per example")
    a("--mcts_c", type=float, default=1.8, help="UCB exploration constant c")
    a("--length_penalty", type=float, default=3.0, help="UCB length penalty lambda (times |path| / L)")
    a("--random_child_prob", type=float, default=0.1, help="probability of a uniformly random child in selection")
    a("--early_stop", type=_parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
      help="stop a search once a path fixes a base error or a correct path has <= L-2 blocks")
    a("--val_fraction", type=float, default=0.2, help="part of the kept traces held out for router metrics")
    a("--epochs", type=int, default=20, help="router training epochs")
    a("--learning_rate", type=float, default=1e-3, help="AdamW learning rate")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    a("--warmup_ratio", type=float, default=0.1, help="share of steps with linear warmup before cosine decay")
    a("--batch_size", type=int, default=16, help="router training batch size (examples)")
    a("--focal_gamma", type=float, default=2.0, help="focal loss gamma")
    a("--class_weight_beta", type=float, default=0.999, help="beta of the effective-number class weights")
    a("--num_windows", type=int, default=8, help="pooling windows W_max (W = min(W_max, T))")
    a("--router_hidden", type=int, default=128, help="router MLP hidden width")
    a("--p", type=float, default=-0.5, help="inference knob in [-1, 1]; -0.5 is the router alone")
    a("--eval_batch_size", type=int, default=8, help="prompts per batch in feature extraction and evaluation")
    a("--seed", type=int, default=0, help="data, search and training seed")
    a("--threads", type=int, default=None, help="torch CPU threads (default: $REPRO_RL_NUM_THREADS, else torch's)")
    a("--progress", type=_parse_bool, nargs="?", const=True, default=True, metavar="BOOL", help="progress bars")
    add_device_arguments(p)
    args = p.parse_args(argv)
    checks = [
        (args.num_search_examples >= 2, "--num_search_examples must be >= 2"),
        (args.num_eval_samples >= 0, "--num_eval_samples must be >= 0"),
        (args.max_new_tokens is None or args.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
        (args.simulations >= 1, "--simulations must be >= 1"),
        (args.path_length_factor >= 0, "--path_length_factor must be >= 0 (0 = no bound)"),
        (0.0 < args.min_agreement <= 1.0, "--min_agreement must lie in (0, 1]"),
        (args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch_size must be >= 1"),
        (0.0 <= args.val_fraction < 1.0, "--val_fraction must lie in [0, 1)"),
        (0.0 <= args.random_child_prob <= 1.0, "--random_child_prob must lie in [0, 1]"),
        (-1.0 <= args.p <= 1.0, "--p must lie in [-1, 1]"),
        (0.0 < args.class_weight_beta < 1.0, "--class_weight_beta must lie in (0, 1)"),
        (args.num_windows >= 1 and args.router_hidden >= 1, "--num_windows and --router_hidden must be >= 1"),
        (args.eval_batch_size >= 1, "--eval_batch_size must be >= 1"),
        ((args.search == "candidates") == (args.candidate_skips is not None),
         "--search candidates needs --candidate_skips (e.g. '3;5;3,5'), and --candidate_skips needs --search candidates"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
        (args.prompt_template is None or "{question}" in args.prompt_template,
         "--prompt_template must contain {question}"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


# Path evaluations of a thinking model must get through <think> ... </think> before \boxed{}: with fewer
# tokens than this no path can be correct, and the search keeps nothing.
THINKING_EVAL_TOKENS, MIN_THINKING_EVAL_TOKENS = 1024, 128


def path_eval_tokens(requested: int | None, thinking: bool) -> int:
    """The greedy budget of a path evaluation: the one asked for (checked), else 15 or 1024 for a thinking model."""
    from routers.traces import TraceError

    if requested is None:
        return THINKING_EVAL_TOKENS if thinking else 15
    if thinking and requested < MIN_THINKING_EVAL_TOKENS:
        raise TraceError(f"--max_new_tokens {requested} cannot work with this model: it thinks first (</think> in its "
                         f"vocabulary) and no path reaches \\boxed{{}} in {requested} tokens; use "
                         f">= {MIN_THINKING_EVAL_TOKENS} (default {THINKING_EVAL_TOKENS}) or a model without a thinking block")
    return requested


def load_splits(args) -> tuple[list[dict], list[dict]]:
    """(search records, held-out records), disjoint by construction."""
    from algos.data import SYNTHETIC_TASKS, ArithmeticTask, DataConfigError, load_records

    if args.dataset in SYNTHETIC_TASKS:
        task = ArithmeticTask(args.arithmetic_digits, args.arithmetic_operands, args.arithmetic_operators)
        search = load_records(args.dataset, "train", args.num_search_examples, args.seed, arithmetic=task)
        held = (load_records(args.dataset, "test", args.num_eval_samples, args.seed, arithmetic=task)
                if args.num_eval_samples else [])
        return search, held
    records = load_records(args.dataset, question_column=args.question_column, answer_column=args.answer_column)
    if len(records) < args.num_search_examples + args.num_eval_samples:
        raise DataConfigError(f"dataset '{args.dataset}' has {len(records)} records, fewer than "
                              f"--num_search_examples + --num_eval_samples = "
                              f"{args.num_search_examples + args.num_eval_samples}")
    held = records[len(records) - args.num_eval_samples:] if args.num_eval_samples else []
    return records[:args.num_search_examples], held


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(args) -> dict:
    import torch

    from algos.data import DEFAULT_PROMPT_TEMPLATE, build_prompt
    from algos.device import dtype_name, resolve_device_dtype
    from probes.cues import has_thinking_block
    from algos.models import load_causal_lm, load_tokenizer
    from routers.evaluate import evaluate_routing
    from routers.export import save_router
    from routers.candidate_search import candidate_search, parse_skip_sets
    from routers.mcts import MCTSConfig
    from routers.routed_model import RoutedModel
    from routers.router import PathRouter
    from routers.traces import TraceError, collect_traces, format_summary, summarize
    from routers.training import RouterTrainConfig, split_indices, teacher_forced_features, train_router

    threads = args.threads or (int(os.environ["REPRO_RL_NUM_THREADS"]) if os.environ.get("REPRO_RL_NUM_THREADS")
                               else None)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(args.output_dir)
    template = args.prompt_template or DEFAULT_PROMPT_TEMPLATE
    search_records, held_records = load_splits(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    args.max_new_tokens = path_eval_tokens(args.max_new_tokens, has_thinking_block(tokenizer))
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model = load_causal_lm(args.model_name_or_path, dtype=dtype).to(device).eval()
    routed = RoutedModel(model)
    L = routed.num_layers
    print(f"[drllm] model {model.config._name_or_path or args.model_name_or_path} ({L} blocks); "
          f"{len(search_records)} search / {len(held_records)} held-out problems from '{args.dataset}'; "
          f"{device} {dtype_name(dtype)}; outputs -> {out_dir}", flush=True)
    timings = {}

    # 1. path search (resumable)
    t0 = time.perf_counter()
    prompts = [build_prompt(tokenizer, r["question"], template) for r in search_records]
    settings = {"dataset": args.dataset, "seed": args.seed, "prompt_template": template}
    if args.dataset == "arithmetic":
        settings["arithmetic"] = [args.arithmetic_digits, args.arithmetic_operands, args.arithmetic_operators]
    if args.search == "candidates":
        skip_sets = parse_skip_sets(args.candidate_skips, L)
        print(f"[drllm 1/4] candidate search: the dense path and {len(skip_sets)} candidates, each generated on "
              f"{len(search_records)} problems ({args.max_new_tokens} new tokens at most)", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        traces = candidate_search(routed, tokenizer, search_records, prompts, skip_sets, out_dir, settings,
                                  args.max_new_tokens, args.require_boxed, args.eval_batch_size,
                                  args.path_length_factor or None, progress=args.progress)
    else:
        print(f"[drllm 1/4] MCTS search: {args.simulations} simulations per example, path reward '{args.path_reward}', "
              f"{args.max_new_tokens} new tokens per dense completion", flush=True)
        mcts = MCTSConfig(simulations=args.simulations, c=args.mcts_c, length_penalty=args.length_penalty,
                          random_child_prob=args.random_child_prob, early_stop=args.early_stop, seed=args.seed)
        traces = collect_traces(routed, tokenizer, search_records, prompts, out_dir / "traces.jsonl", settings, mcts,
                                args.max_new_tokens, args.require_boxed, progress=args.progress,
                                evaluator_options={"verify_draft": args.verify_draft,
                                                   "length_factor": args.path_length_factor or None,
                                                   "reward": args.path_reward, "min_agreement": args.min_agreement},
                                draft_batch_size=args.eval_batch_size)
    search_summary = summarize(traces, L)
    timings["search_s"] = round(time.perf_counter() - t0, 1)
    print(f"[drllm] search: {format_summary(search_summary)}", flush=True)
    kept = [t for t in traces if t["kept"]]
    if len(kept) < 2:
        raise TraceError(f"only {len(kept)} of {len(traces)} searched examples have a correct path; the router needs "
                         "at least 2: search more examples (--num_search_examples) or make the task easier")

    # 2. teacher-forced features and router training
    t0 = time.perf_counter()
    print(f"[drllm 2/4] router training on {len(kept)} kept traces (teacher forcing, focal loss)", flush=True)
    data = teacher_forced_features(routed, tokenizer, [t["prompt"] for t in kept], [t["labels"] for t in kept],
                                   args.num_windows, args.eval_batch_size, progress=args.progress)
    train_idx, val_idx = split_indices(len(kept), args.val_fraction, args.seed)
    router = PathRouter(L, model.config.hidden_size, args.router_hidden, args.num_windows).to(device)
    cfg = RouterTrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                            warmup_ratio=args.warmup_ratio, batch_size=args.batch_size, gamma=args.focal_gamma,
                            beta=args.class_weight_beta, seed=args.seed)
    metrics = train_router(router, data.subset(train_idx), data.subset(val_idx) if val_idx else None, cfg,
                           progress=args.progress)
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    for split in ("train", "val"):
        if split in metrics:
            m = metrics[split]
            print(f"[drllm] router {split} ({m['examples']} ex): per-layer accuracy {m['layer_accuracy']:.3f} "
                  f"(always-execute {m['always_execute_accuracy']:.3f}), macro-F1 {m['macro_f1']:.3f}, exact paths "
                  f"{m['path_exact']:.2f}, blocks {m['mean_layers_predicted']:.2f} predicted vs "
                  f"{m['mean_layers_target']:.2f} target", flush=True)

    # 3. held-out accuracy routed vs unrouted
    evaluation = None
    if held_records:
        t0 = time.perf_counter()
        print(f"[drllm 3/4] held-out eval on {len(held_records)} problems: router at prefill (p={args.p}) vs dense",
              flush=True)
        evaluation = evaluate_routing(routed, tokenizer, router, [build_prompt(tokenizer, r["question"], template)
                                                                 for r in held_records],
                                      [r["answer"] for r in held_records], args.max_new_tokens, args.require_boxed,
                                      args.eval_batch_size, args.p, progress=args.progress)
        timings["eval_s"] = round(time.perf_counter() - t0, 1)
    else:
        print("[drllm 3/4] held-out eval skipped (--num_eval_samples 0)", flush=True)

    # 4. export
    print("[drllm 4/4] export", flush=True)
    metrics = {**metrics, "search": search_summary, "heldout": evaluation,
               "split": {"train": len(train_idx), "val": len(val_idx)}}
    router_dir = save_router(router, out_dir / "router", model, metrics=metrics, p_default=args.p,
                             extra={"training_args": vars(args)})
    summary = {"search": search_summary, "router_train": metrics["train"], "router_val": metrics.get("val"),
               "heldout": evaluation, "timings": timings, "router_dir": str(router_dir),
               "traces": str(out_dir / "traces.jsonl")}
    _write_json(out_dir / "summary.json", summary)

    print(f"[drllm] done in {sum(timings.values()):.0f} s ({timings})")
    print(f"[drllm] kept/searched {search_summary['kept']}/{search_summary['searched']}, base errors fixed "
          f"{search_summary['fixed_base_errors']}, mean layers saved by targets {search_summary['mean_layers_saved']:.2f}")
    if evaluation:
        print(f"[drllm] held-out ({evaluation['examples']} problems): accuracy routed {evaluation['accuracy_routed']:.3f} "
              f"vs unrouted {evaluation['accuracy_unrouted']:.3f} (fixed {evaluation['fixed']}, broken "
              f"{evaluation['broken']}); mean blocks executed {evaluation['mean_layers_routed']:.2f} vs {L}")
    print(f"[drllm] router -> {router_dir}; traces -> {out_dir / 'traces.jsonl'}; summary -> {out_dir / 'summary.json'}")
    return summary


def main(argv=None):
    args = parse_args(argv)

    from routers.traces import TraceError

    return main_guard(lambda: run(args), errors=(TraceError,))


if __name__ == "__main__":
    main()

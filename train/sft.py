"""SFT: fine-tune a causal LM on prompt-completion pairs with TRL's SFTTrainer (the usual step before RL).

    python train/sft.py                                   # the thinking default's recipe -> runs/sft
    python train/sft.py --num_train_samples 2000 --recheck_rate 0.5 --output_dir runs/sft-short
    python train/sft.py --dataset my_traces.jsonl
    python train/sft.py --model_name_or_path smollm2-135m-thinking --skip_distillation_sets "3,4;3,4,6" ...

The default data are the seeded thinking traces of algos/thinking_task.py (<think>, one step per line,
"wait"/"hmm" cues, caught mistakes, re-checks, </think>, \\boxed{} answer); their statistics are flags.
Any dataset in TRL's prompt-completion, conversational or text layout works too. The model and
tokenizer are saved to --output_dir, ready for --model_name_or_path. The thinking default itself,
`--model_name_or_path smollm2-135m-thinking` in any job, is this recipe run once and cached.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.cli import _OneLineParser, _parse_bool, main_guard  # noqa: E402


def parse_args(argv=None):
    from algos.sft import SFTJobConfig

    d, task, style = SFTJobConfig(), SFTJobConfig().task, SFTJobConfig().task.style
    p = _OneLineParser(prog="sft.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model_name_or_path", default=d.model_name_or_path,
      help="HF hub id or local path; default: the embedded SmolLM2-135M-Instruct")
    a("--output_dir", default=d.output_dir, help="where the fine-tuned model and tokenizer go (replaced atomically)")
    a("--dataset", default=d.dataset, help="'thinking' (seeded traces) or a TRL-layout .jsonl/.json/.parquet or hub name")
    a("--num_train_samples", type=int, default=d.num_train_samples, help="training examples")
    a("--num_train_epochs", type=float, default=d.num_train_epochs, help="passes over the examples")
    a("--learning_rate", type=float, default=d.learning_rate, help="peak learning rate (cosine schedule)")
    a("--per_device_train_batch_size", type=int, default=d.per_device_train_batch_size, help="examples per step")
    a("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps, help="micro-steps per update")
    a("--warmup_ratio", type=float, default=d.warmup_ratio, help="share of the steps spent warming up")
    a("--max_length", type=int, default=d.max_length, help="prompt + completion tokens kept per example")
    a("--seed", type=int, default=d.seed, help="trace and training seed")
    a("--add_think_tokens", type=_parse_bool, nargs="?", const=True, default=d.add_think_tokens, metavar="BOOL",
      help="add <think> and </think> to the tokenizer as single tokens")
    a("--layer_dropout", type=float, default=d.layer_dropout,
      help="skip each decoder block for a training step with this rate (LayerDrop/LayerSkip), so that blocks can be "
           "skipped at inference (Dr.LLM's router); 0: off")
    a("--layer_dropout_schedule", choices=("uniform", "exponential"), default=d.layer_dropout_schedule,
      help="the same rate for every block, or LayerSkip's rising with depth (0 at the first block, the rate at the last)")
    a("--layer_dropout_blocks", default=d.layer_dropout_blocks,
      help="'3-7,25': the rate on those blocks only (the ones a router should learn to skip); empty: every block")
    a("--skip_distillation_sets", default=d.skip_distillation_sets,
      help="'3,4;3,4,6': each step also runs the batch with one of these skip sets and trains it towards the dense "
           "path's predictions (inplace distillation), so a router (Dr.LLM) can skip those blocks; empty: off")
    a("--skip_distillation_weight", type=float, default=d.skip_distillation_weight,
      help="weight λ of the distillation term: CE(dense) + λ·KL(dense ‖ skipped)")
    a("--bf16", type=_parse_bool, nargs="?", const=True, default=d.bf16, metavar="BOOL",
      help="bf16 autocast; default: where it is fast (a CUDA GPU with bf16, a CPU with AVX-512; float32 on an AVX2-only CPU)")
    a("--report_to", default=d.report_to, help="'none', 'wandb', 'tensorboard' (transformers' loggers)")
    a("--progress", type=_parse_bool, nargs="?", const=True, default=d.progress, metavar="BOOL", help="progress bar")
    g = p.add_argument_group("thinking traces (--dataset thinking)")
    g.add_argument("--min_operands", type=int, default=task.min_operands, help="fewest numbers in a problem")
    g.add_argument("--max_operands", type=int, default=task.max_operands, help="most numbers in a problem")
    g.add_argument("--digits", type=int, default=task.digits, help="digits per number")
    g.add_argument("--word_problem_fraction", type=float, default=task.word_problem_fraction,
                   help="share of problems asked as word problems")
    g.add_argument("--correction_rate", type=float, default=style.correction_rate,
                   help="chance a step is first written wrong, then caught ('Wait, ... is X, not Y.')")
    g.add_argument("--check_rate", type=float, default=style.check_rate,
                   help="chance a step is followed by a 'Hmm, ...' check")
    g.add_argument("--recheck_rate", type=float, default=style.recheck_rate,
                   help="expected redundant re-checks of the whole chain after the answer is known")
    g.add_argument("--max_rechecks", type=int, default=style.max_rechecks, help="most re-checks per trace")
    args = p.parse_args(argv)
    if not 0.0 <= args.layer_dropout < 1.0:
        p.error(f"--layer_dropout must be in [0, 1), got {args.layer_dropout}")
    from algos.config import ConfigError
    from algos.layer_dropout import parse_blocks
    from algos.skip_distillation import parse_skip_sets
    try:
        parse_blocks(args.layer_dropout_blocks)
    except ConfigError as exc:
        p.error(f"--layer_dropout_blocks: {exc}")
    if args.skip_distillation_sets.strip():
        try:
            parse_skip_sets(args.skip_distillation_sets)
        except ConfigError as exc:
            p.error(f"--skip_distillation_sets: {exc}")
        if args.layer_dropout > 0:
            p.error("--layer_dropout and --skip_distillation_sets: choose one of them")
        if not args.skip_distillation_weight > 0:
            p.error(f"--skip_distillation_weight must be > 0, got {args.skip_distillation_weight}")
    return args


def main(argv=None):
    args = parse_args(argv)

    def run():
        from algos.sft import SFTJobConfig, run_sft
        from algos.thinking_task import ThinkingTask, TraceStyle

        values = vars(args)
        style = TraceStyle(**{k: values.pop(k) for k in ("correction_rate", "check_rate", "recheck_rate",
                                                         "max_rechecks")})
        task = ThinkingTask(style=style, **{k: values.pop(k) for k in ("min_operands", "max_operands", "digits",
                                                                        "word_problem_fraction")})
        path = run_sft(SFTJobConfig(**values, task=task))
        print(f"[repro-rl] SFT model saved to {path}; use it with --model_name_or_path {path}")

    return main_guard(run)


if __name__ == "__main__":
    main()

"""LYNX exit probe: collect -> train -> calibrate -> export (-> held-out evaluation).

    python train/lynx_probe.py --model_name_or_path runs/grpo/final --confidence 0.95
    python train/lynx_probe.py --dataset arithmetic --num_problems 64 --num_eval_problems 32 --max_new_tokens 96

The logic lives in probes/pipeline.py; this script parses flags. Events are collected into
--data_dir (default <output_dir>-events; a rerun with the same settings resumes), the probe is
exported to --output_dir (safetensors + JSON, with the calibration scores so the confidence can be
changed at decode time), every figure goes to <output_dir>/summary.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algos.device import add_device_arguments  # noqa: E402
from train.cli import _OneLineParser, _parse_bool, main_guard  # noqa: E402


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _strings(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def parse_args(argv=None):
    from probes.pipeline import LynxJobConfig

    d = LynxJobConfig()
    p = _OneLineParser(prog="lynx_probe.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model_name_or_path", default=d.model_name_or_path,
      help="HF hub id or local path; default: the embedded SmolLM2-135M-Instruct")
    a("--output_dir", default=d.output_dir, help="the probe export (replaced atomically) and summary.json")
    a("--data_dir", default=d.data_dir, help="collected events (resumable); default: <output_dir>-events")
    a("--dataset", default=d.dataset, help="'gsm8k' (shipped train split), 'arithmetic', 'thinking', an HF hub name or a local "
                                           ".jsonl/.json/.parquet")
    a("--question_column", default=d.question_column, help="question column of an HF/local dataset")
    a("--answer_column", default=d.answer_column, help="answer column of an HF/local dataset")
    a("--arithmetic_digits", type=int, default=d.arithmetic_digits, help="digits per operand (arithmetic)")
    a("--arithmetic_operands", type=int, default=d.arithmetic_operands, help="operands per problem (arithmetic)")
    a("--arithmetic_operators", default=d.arithmetic_operators, help="operators drawn from '+-*' (arithmetic)")
    a("--num_problems", type=int, default=d.num_problems,
      help="training problems, one rollout each, split by problem into probe-train and calibration "
           "(gsm8k/files: the first N records; arithmetic: distinct train-split problems)")
    a("--calibration_fraction", type=float, default=d.calibration_fraction,
      help="share of the training problems used for conformal calibration")
    a("--num_eval_problems", type=int, default=d.num_eval_problems,
      help="held-out problems (gsm8k/files: the last N records; arithmetic: its test split) for the premature-exit "
           "rate and decoding with/without exits; 0 skips the evaluation")
    a("--confidence", type=float, default=d.confidence, help="default confidence c = 1 - delta stored in the export")
    a("--eval_confidences", type=_floats, default=d.eval_confidences, metavar="C1,C2",
      help="confidences of the held-out decoding runs")
    a("--cue_preset", default=d.cue_preset, choices=("auto", "words", "linebreak"),
      help="'words' (hmm, wait, alternatively), 'linebreak' (every line break; for models that never say the cue "
           "words, like the default model), 'auto': words for thinking models (</think>), linebreak otherwise")
    a("--cues", type=_strings, default=d.cues, metavar="CUE1,CUE2", help="cue strings; override --cue_preset")
    a("--exit_string", default=d.exit_string,
      help="appended at an exit; default '</think> Final Answer: \\boxed{' for thinking models, "
           "'\\nFinal Answer: \\boxed{' otherwise")
    a("--layers", type=_ints, default=d.layers, metavar="I,J,K",
      help="hidden-state indices of the features (0 = embeddings); default about 1/3, 2/3 depth and the last")
    a("--prompt_template", default=d.prompt_template, help="prompt with a {question} field (chat template applied)")
    a("--batch_size", type=int, default=d.batch_size, help="rollouts per batch (one shard on disk per batch)")
    a("--max_new_tokens", type=int, default=d.max_new_tokens,
      help="rollout and evaluation token budget; default 512, or 4096 for a thinking model (</think> in its vocabulary)")
    a("--temperature", type=float, default=d.temperature, help="rollout sampling temperature")
    a("--top_p", type=float, default=d.top_p, help="rollout nucleus sampling")
    a("--answer_max_tokens", type=int, default=d.answer_max_tokens, help="greedy answer tokens after an exit")
    a("--stop_at_answer_close", type=_parse_bool, nargs="?", const=True, default=d.stop_at_answer_close,
      metavar="BOOL", help="end an exit answer once the brace the exit string opened is closed")
    a("--max_events_per_rollout", type=int, default=d.max_events_per_rollout,
      help="events kept per rollout (evenly spaced) for probe training")
    a("--max_calibration_events_per_rollout", type=int, default=d.max_calibration_events_per_rollout,
      help="events kept per rollout for calibration and the held-out events")
    a("--forced_batch_size", type=int, default=d.forced_batch_size, help="forced exits decoded per batch")
    a("--eval_batch_size", type=int, default=d.eval_batch_size, help="prompts per batch in held-out decoding")
    a("--eval_require_boxed", type=_parse_bool, nargs="?", const=True, default=d.eval_require_boxed, metavar="BOOL",
      help="held-out decoding: an answer counts only inside \\boxed{} (exit answers always are)")
    a("--eval_temperature", type=float, default=d.eval_temperature,
      help="held-out decoding: 0 is greedy; > 0 samples at this temperature with --eval_top_p (how R1-style models "
           "are run), every arm with the same seeds, so an exit arm follows the no-exit trajectory up to its exit")
    a("--eval_top_p", type=float, default=d.eval_top_p, help="nucleus sampling of the held-out decoding (with --eval_temperature)")
    a("--eval_samples", type=int, default=d.eval_samples,
      help="sampled held-out decoding: rollouts per problem in every arm (other seeds per pass; pass 0 is the "
           "single-pass run), for a tighter accuracy comparison; needs --eval_temperature > 0")
    a("--exit_label", default=d.exit_label, choices=("forced", "no_regret"),
      help="how a cue event is labelled safe: 'forced' (LYNX: the forced answer is correct) or 'no_regret' (the forced "
           "answer is correct, or the rollout's own answer is wrong, so exiting costs nothing); the conformal bound "
           "holds for the chosen label")
    a("--seed", type=int, default=d.seed, help="problem split, sampling and probe seed")
    a("--threads", type=int, default=None, help="torch CPU threads (default: $REPRO_RL_NUM_THREADS, else torch's)")
    a("--progress", type=_parse_bool, nargs="?", const=True, default=d.progress, metavar="BOOL", help="progress bars")
    add_device_arguments(p)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)

    from probes.collect import CollectError
    from probes.cues import CueConfigError
    from probes.export import ProbeLoadError
    from probes.pipeline import LynxJobConfig, LynxJobError, run_lynx_job
    from probes.probe import ProbeTrainConfig

    def run():
        import torch

        threads = args.threads or int(os.environ.get("REPRO_RL_NUM_THREADS") or 0)
        if threads:
            torch.set_num_threads(threads)
        values = {k: v for k, v in vars(args).items() if k != "threads"}
        return run_lynx_job(LynxJobConfig(**values, probe=ProbeTrainConfig(seed=args.seed)))

    return main_guard(run, errors=(LynxJobError, CollectError, CueConfigError, ProbeLoadError))


if __name__ == "__main__":
    main()

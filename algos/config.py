"""One documented dataclass config for every RL entry point.

Field names follow TRL's ``GRPOConfig`` where the concept exists (``num_generations``,
``max_completion_length``, ``beta``, ``epsilon``, ``epsilon_high``, ``loss_type``,
``scale_rewards``, ``num_iterations``, ...). Each field's ``help`` is what ``--help`` prints.

The defaults are the headline run, ``accelerate launch train/grpo.py --reward repro``: the thinking
default model (``smollm2-135m-thinking``, built and cached on first use) on the thinking task, 12 steps of
16 completions with vLLM rollouts under bf16 (fp32 on a CPU without fast bf16) and DAPO's dynamic sampling
(a prompt whose completions all score the same is replaced), held-out accuracy before
and after, sized to fit 15 minutes with set-up on a 2-core Intel Xeon with AMX (7 steps, the earlier
default, fit them on an AMD EPYC with AVX512-BF16 and took 15–18 on an AVX2-only one). The other configs
in ``configs/`` set every field they rely on.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from algos.device import bf16_is_fast

ALGORITHMS = ("grpo", "ppo", "reinforce_pp", "reinforce_pp_baseline")
LOSS_TYPES = {  # TRL loss_type -> aggregation mode of algos.losses.aggregate
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
KL_IN_REWARD = {"ppo": True, "reinforce_pp": True, "grpo": False, "reinforce_pp_baseline": False}
DEFAULT_BETA = {"ppo": 0.01, "reinforce_pp": 0.01, "grpo": 0.0, "reinforce_pp_baseline": 0.001}


class ConfigError(ValueError):
    """A config value a user set is unknown or invalid; the message names the field."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RLConfig:
    # --- what to run ---------------------------------------------------------------------------
    algorithm: str = _f("grpo", "RL algorithm: grpo, ppo, reinforce_pp or reinforce_pp_baseline "
                        "(set by the entry point script).", choices=ALGORITHMS)
    model_name_or_path: str = _f("smollm2-135m-thinking", "HF hub id, local path, "
                                 "'smollm2-135m-instruct' for the embedded default model, or "
                                 "'smollm2-135m-thinking' for it after SFT on thinking traces (built on "
                                 "first use, a few minutes on CPU).")
    output_dir: str = _f("", "Where checkpoints, logs and the final model go (default runs/<algorithm>).")
    run_name: str = _f("", "Run name for W&B / TensorBoard (default: the output_dir name).")
    seed: int = _f(42, "Random seed (data order, sampling, initialisation).")
    # --- data ----------------------------------------------------------------------------------
    dataset: str = _f("thinking", "'arithmetic' (seeded synthetic task), 'thinking' (multi-step problems with "
                      "reasoning traces, for thinking models), 'gsm8k' (shipped train "
                      "split), an HF hub dataset name, or a local .jsonl/.json/.parquet file; TRL's prompt "
                      "column (messages or text) and verl's parquet layout load as they are.")
    dataset_split: str = _f("train", "Split of an HF hub dataset to train on.")
    question_column: str = _f("question", "Dataset column holding the question (used when the dataset "
                              "has no 'prompt' column).")
    answer_column: str = _f("answer", "Dataset column holding the ground-truth answer; for 'answer', "
                            "else 'solution' (TRL) or reward_model.ground_truth (verl).")
    prompt_template: str = _f(
        "{question}\nGive the final answer as a number in \\boxed{{}}, for example \\boxed{{42}}.",
        "Python format string for the user message; {question} is replaced (question datasets only).")
    system_prompt: str = _f("", "Optional system message (empty: the chat template's default; question "
                            "datasets only).")
    use_chat_template: bool = _f(True, "Wrap question prompts in the tokenizer's chat template (a "
                                 "dataset's chat-message prompts always are).")
    arithmetic_digits: int = _f(2, "Arithmetic task: digits per operand.")
    arithmetic_operands: int = _f(2, "Arithmetic task: number of operands.")
    arithmetic_operators: str = _f("+", "Arithmetic task: operators to draw from ('+', '+-', '+-*').")
    arithmetic_test_fraction: float = _f(0.3, "Arithmetic task: share of the problem space held out "
                                         "for evaluation (never trained on).")
    num_train_samples: int = _f(10000, "Training problems to use (arithmetic: problems generated).")
    num_eval_samples: int = _f(128, "Held-out problems for evaluation (arithmetic: its test split; "
                               "other datasets: the last N records, kept out of training).")
    eval_steps: int = _f(0, "Evaluate greedy accuracy every N steps (0: only at the end).")
    eval_on_start: bool = _f(True, "Evaluate once before training.")
    eval_batch_size: int = _f(128, "Prompts per evaluation generate call (the default held-out set in one "
                              "call; with vLLM it also sizes the engine's concurrent sequences).")
    # --- rewards -------------------------------------------------------------------------------
    reward: str = _f("accuracy", "Comma-separated rewards: registered names (accuracy, format, overlong, "
                     "repro), module:function or file.py:function with TRL's, verl's or OpenRLHF's "
                     "signature, file.py (its compute_score or reward_func), or a sequence-classification "
                     "model's hub id or directory.")
    reward_weights: str = _f("", "Comma-separated weights, one per outcome reward (REPRO excluded; "
                             "its weight is --repro_alpha). Default all 1.0.")
    overlong_buffer_length: int = _f(0, "The 'overlong' reward (DAPO's soft overlong punishment): the "
                                     "penalty ramps from 0 to -1 over the last N tokens before "
                                     "max_completion_length (0: a quarter of max_completion_length).")
    overlong_penalty_factor: float = _f(1.0, "The 'overlong' reward: the penalty at the limit.")
    # --- REPRO process reward (--reward repro, or add ',repro' to other rewards) --------------
    repro_alpha: float = _f(0.1, "REPRO: weight alpha of the process advantage, A = A_outcome + alpha * A~.")
    repro_top_k: int = _f(20, "REPRO: segment starts scored per rollout (highest policy entropy first).")
    repro_stability_weight: float = _f(0.1, "REPRO: w in S = (1 - w) * magnitude + w * stability.")
    repro_ema: float = _f(0.0, "REPRO: EMA factor smoothing J before Kendall tau (0: off).")
    repro_answer_template: str = _f("\\boxed{{{answer}}}", "REPRO: how the ground-truth answer is "
                                    "written after each prefix ({answer} is replaced).")
    repro_think_end_marker: str = _f("</think>", "REPRO: end-of-thinking marker; without it the whole "
                                     "response is scored.")
    repro_micro_batch_size: int = _f(8, "REPRO: rollouts per packed scoring forward pass.")
    # --- generation ----------------------------------------------------------------------------
    num_generations: int = _f(8, "Completions sampled per prompt (group size G).")
    max_prompt_length: int = _f(256, "Prompts longer than this (tokens) are truncated from the left.")
    max_completion_length: int = _f(256, "Maximum generated tokens per completion.")
    temperature: float = _f(0.7, "Sampling temperature (also divides the logits in the loss).")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    generation_batch_size: int = _f(0, "Sequences per generate call (0: the whole rollout batch).")
    drop_finished_sequences: bool = _f(True, "HF rollout: sample with our KV-cached loop, in which a "
                                       "finished completion leaves the batch (False: transformers' "
                                       "generate, which keeps finished rows to the end).")
    rollout: str = _f("hf", "Rollout engine: 'hf' (num_generations samples per prompt with HF generate) or "
                      "'eager' (EAGER entropy-aware branching: a variable number of completions per prompt, "
                      "at most num_generations before reallocation; grpo and reinforce_pp_baseline only).",
                      choices=("hf", "eager"))
    use_vllm: bool = _f(True, "Sample rollouts (and held-out evaluation) with a colocated vLLM engine, "
                        "weight-synced from the policy before each rollout (pip install -e .[vllm]; "
                        "false: our own sampler, which --rollout eager needs).")
    vllm_mode: str = _f("colocate", "vLLM integration: 'colocate' (one engine inside each training process, "
                        "tensor parallel 1). 'server' is not supported.", choices=("colocate", "server"))
    vllm_gpu_memory_utilization: float = _f(0.3, "vLLM: share of GPU memory for weights and KV cache "
                                            "(CUDA; on CPU the KV cache is sized for one full batch).")
    vllm_enable_sleep_mode: bool = _f(False, "vLLM: free the KV cache and offload weights during the "
                                      "update, wake before the next rollout (CUDA only; ignored on CPU).")
    vllm_max_model_len: int = _f(0, "vLLM: context length (0: max_prompt_length + max_completion_length).")
    vllm_dtype: str = _f("auto", "vLLM weights and activations: auto (bfloat16 with --bf16, else float32), "
                         "bfloat16 or float32.", choices=("auto", "bfloat16", "float32"))
    vllm_enforce_eager: str = _f("auto", "vLLM: run the model eagerly (true) or compiled (false: torch.compile, "
                                 "and CUDA graphs on a GPU). auto: eager on CPU (compiling takes about a minute "
                                 "there), vLLM's compiled default on CUDA.", choices=("auto", "true", "false"))
    vllm_importance_sampling_correction: bool = _f(True, "With vLLM: weight the policy loss by the truncated "
                                                   "importance ratio pi_train / pi_vllm of the sampled tokens.")
    vllm_importance_sampling_mode: str = _f("token_truncate", "How the ratio is formed and capped: "
                                            "token_truncate, token_mask, sequence_truncate, sequence_mask.",
                                            choices=("token_truncate", "token_mask", "sequence_truncate",
                                                     "sequence_mask"))
    vllm_importance_sampling_cap: float = _f(3.0, "Cap C of the importance ratio (truncate: min(r, C); "
                                             "mask: 0 where r > C).")
    eager_mode: str = _f("full", "EAGER: 'init' (branching only), 'adapt' (spare budget to prompts that hit "
                         "the cap) or 'full' (spare budget to groups with no correct completion; the reward "
                         "stack is the verifier).", choices=("init", "adapt", "full"))
    eager_threshold: float = _f(2.0, "EAGER: branch when the top-K renormalised entropy (nats) exceeds this.")
    eager_entropy_top_k: int = _f(20, "EAGER: K of the top-K entropy.")
    eager_quiet_steps: int = _f(1000, "EAGER: stop branching a prompt after this many steps without a branch.")
    eager_dynamic_threshold: bool = _f(False, "EAGER: threshold = max(theta, 99th percentile of the "
                                       "prompt's entropies so far).")
    eager_sample_fork: bool = _f(False, "EAGER: draw both fork tokens from the policy without replacement "
                                 "(default: parent top-1, child top-2).")
    # --- batch sizes ---------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "Completions per forward/backward micro-batch.")
    gradient_accumulation_steps: int = _f(2, "Micro-batches per optimizer step.")
    max_tokens_per_micro_batch: int = _f(0, "Cap each forward/backward pass at this many padded tokens "
                                         "(rows x longest row; long completions then run in smaller "
                                         "pieces, the gradient unchanged). 0: no cap. Ignored under "
                                         "DeepSpeed, which expects one backward per micro-batch.")
    logprobs_chunk_size: int = _f(1024, "Compute log-probs and entropies from the last hidden states, this "
                                  "many tokens of logits at a time (recomputed in the backward pass), "
                                  "instead of the full (B, T, vocab) logits: the memory of long "
                                  "completions. 0: full logits.")
    shared_prompt_forward: bool = _f(True, "Run each distinct prompt of a micro-batch through the model once "
                                     "and its completions on that prompt's KV cache (Prefix Grouper): the same "
                                     "log-probs and gradients with fewer tokens. Needs --logprobs_chunk_size > 0; "
                                     "off with --gradient_checkpointing. PPO: the policy's pass and the critic's "
                                     "(a shared critic reads the policy's; a separate one shares prompts too).")
    steps_per_generation: int = _f(1, "Optimizer steps per rollout batch and iteration. A rollout batch "
                                   "holds per_device_train_batch_size x gradient_accumulation_steps x "
                                   "steps_per_generation completions per process.")
    num_iterations: int = _f(1, "Passes over each rollout batch (PPO epochs, GRPO's mu).")
    max_steps: int = _f(12, "Training steps; one step = one rollout batch and its updates.")
    # --- optimisation --------------------------------------------------------------------------
    learning_rate: float = _f(1e-5, "Policy learning rate (AdamW).")
    critic_learning_rate: float = _f(1e-5, "PPO critic learning rate.")
    critic_backbone: str = _f("separate", "PPO critic: 'separate' (a copy of the policy's backbone, "
                              "as verl/OpenRLHF) or 'shared' (a value head on the policy's backbone: "
                              "half the compute).", choices=("separate", "shared"))
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    lr_scheduler_type: str = _f("constant", "Learning-rate schedule: constant, linear or cosine.",
                                choices=("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "Linear warm-up, in optimizer steps.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).")
    bf16: bool = _f(bf16_is_fast(), "Run the policy in bfloat16 (mixed precision through Accelerate: fp32 "
                    "master weights); false: fp32 throughout. Default: true where bf16 is fast (a CUDA GPU with "
                    "bf16, a CPU with AVX-512), false on an AVX2-only CPU, which emulates bf16 about 27x slower.")
    ds3_gather_for_generation: bool = _f(True, "DeepSpeed ZeRO-3: gather the policy's parameters once per "
                                         "rollout and evaluation (TRL's name) instead of layer by layer "
                                         "at every decoding step. Off for a model too big for one device.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    # --- the loss ------------------------------------------------------------------------------
    loss_type: str = _f("dapo", "Loss aggregation: grpo (per-sequence mean, then mean), dr_grpo "
                        "(sum / (B x max_completion_length)), dapo (mean over all tokens).",
                        choices=tuple(LOSS_TYPES))
    scale_rewards: str = _f("group", "GRPO: divide advantages by the group's reward std ('group'), by the "
                            "std of the whole batch ('batch': a group differing only in a small reward "
                            "term keeps a small advantage) or not at all ('none', Dr.GRPO).",
                            choices=("group", "batch", "none"))
    importance_sampling_level: str = _f("token", "Importance ratio and clipping per token (PPO/GRPO) or per "
                                        "sequence ('sequence': GSPO, the length-normalised sequence "
                                        "ratio; its paper clips at epsilon 3e-4 / epsilon_high 4e-4).",
                                        choices=("token", "sequence"))
    mask_truncated_completions: bool = _f(False, "Leave completions cut at max_completion_length out of "
                                          "the loss (they still count in their group's rewards).")
    dynamic_sampling: bool = _f(True, "DAPO dynamic sampling: drop groups whose rewards are all equal and "
                                "sample fresh prompts until each process has its share of informative "
                                "groups (at most dynamic_sampling_max_rounds rounds per step). On by default: "
                                "the headline's steps of 2 prompts learn with it (README).")
    dynamic_sampling_max_rounds: int = _f(4, "Dynamic sampling: generation rounds per step at most; "
                                          "short after them, the step trains on the groups it has.")
    epsilon: float = _f(0.2, "PPO clip range (lower).")
    epsilon_high: float = _f(0.0, "Upper clip range, clip-higher as in DAPO (0: same as epsilon).")
    dual_clip: float = _f(0.0, "Dual-clip bound c > 1 for negative advantages (0: off; 3 is usual).")
    beta: float = _f(-1.0, "KL coefficient (-1: algorithm default: grpo 0, reinforce_pp_baseline "
                     "0.001, ppo and reinforce_pp 0.01). In the reward for ppo/reinforce_pp, in "
                     "the loss for grpo/reinforce_pp_baseline; 0 loads no reference model.")
    kl_estimator: str = _f("", "KL estimator k1, k2 or k3 (default: k1 in the reward, k3 in the loss).")
    gamma: float = _f(1.0, "Discount (PPO GAE and REINFORCE++ returns).")
    lam: float = _f(0.95, "GAE lambda (PPO).")
    cliprange_value: float = _f(0.5, "PPO value-loss clip range.")
    vf_coef: float = _f(0.5, "PPO value-loss coefficient.")
    # --- PEFT ----------------------------------------------------------------------------------
    use_peft: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: str = _f("all-linear", "Comma-separated module names, or 'all-linear'.")
    # --- logging and checkpoints ---------------------------------------------------------------
    report_to: str = _f("wandb", "wandb (offline when no API key is set), tensorboard, or none. "
                        "metrics.jsonl is always written to output_dir.",
                        choices=("wandb", "tensorboard", "none"))
    wandb_project: str = _f("repro-rl", "W&B project.")
    logging_steps: int = _f(1, "Log metrics every N steps.")
    log_completions_steps: int = _f(10, "Log a table of sample completions every N steps (0: off).")
    num_completions_to_print: int = _f(4, "Completions per logged table.")
    save_steps: int = _f(0, "Save a checkpoint every N steps (0: only the final model).")
    save_total_limit: int = _f(2, "Keep at most N step checkpoints (0: keep all).")
    resume_from_checkpoint: str = _f("", "'latest' or a checkpoint directory to resume from.")

    def __post_init__(self):
        self.validate()

    # Derived values ---------------------------------------------------------------------------
    @property
    def kl_coef(self) -> float:
        return DEFAULT_BETA[self.algorithm] if self.beta < 0 else self.beta

    @property
    def kl_in_reward(self) -> bool:
        return KL_IN_REWARD[self.algorithm]

    @property
    def kl_kind(self) -> str:
        return self.kl_estimator or ("k1" if self.kl_in_reward else "k3")

    @property
    def reward_names(self) -> list[str]:
        return [r.strip() for r in self.reward.split(",") if r.strip()]

    @property
    def use_repro(self) -> bool:
        return "repro" in self.reward_names

    @property
    def outcome_rewards(self) -> list[str]:
        """The sequence-level rewards; '--reward repro' alone means accuracy + REPRO."""
        return [r for r in self.reward_names if r != "repro"] or ["accuracy"]

    @property
    def policy_loss_name(self) -> str:
        """The entry of ``algos.losses.POLICY_LOSSES`` this config uses."""
        return "gspo" if self.importance_sampling_level == "sequence" else "vanilla"

    @property
    def overlong_buffer(self) -> int:
        return self.overlong_buffer_length or max(1, self.max_completion_length // 4)

    @property
    def agg_mode(self) -> str:
        return LOSS_TYPES[self.loss_type]

    @property
    def rollout_batch_size(self) -> int:
        """Completions per process per step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.steps_per_generation

    @property
    def prompts_per_device(self) -> int:
        return self.rollout_batch_size // self.num_generations

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"invalid --{name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"choose one of {', '.join(choices)}")
        for name in ("num_generations", "max_completion_length", "max_prompt_length",
                     "per_device_train_batch_size", "gradient_accumulation_steps",
                     "steps_per_generation", "num_iterations", "max_steps", "logging_steps",
                     "num_train_samples", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("learning_rate", "critic_learning_rate", "temperature"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.epsilon <= 0 or self.epsilon_high < 0:
            bad("epsilon", "clip ranges must be > 0")
        if self.dual_clip and self.dual_clip <= 1:
            bad("dual_clip", "must be > 1 (or 0 for off)")
        if self.dual_clip and self.importance_sampling_level == "sequence":
            bad("dual_clip", "applies to token-level ratios; GSPO (--importance_sampling_level sequence) "
                "clips whole sequences: set it to 0")
        if self.dynamic_sampling and self.num_generations < 2:
            bad("dynamic_sampling", "(on by default) compares the completions of a prompt: use "
                "num_generations >= 2, or --dynamic_sampling false")
        if self.logprobs_chunk_size < 0:
            bad("logprobs_chunk_size", "must be >= 0 (0: full logits)")
        if self.max_tokens_per_micro_batch < 0:
            bad("max_tokens_per_micro_batch", "must be >= 0 (0: no cap)")
        if self.dynamic_sampling_max_rounds < 1:
            bad("dynamic_sampling_max_rounds", "must be >= 1")
        if self.overlong_buffer_length < 0 or self.overlong_buffer_length > self.max_completion_length:
            bad("overlong_buffer_length", f"must be in [0, max_completion_length={self.max_completion_length}]")
        if self.beta < 0 and self.beta != -1.0:
            bad("beta", "must be >= 0 (or -1 for the algorithm default)")
        if self.kl_estimator not in ("", "k1", "k2", "k3"):
            bad("kl_estimator", "choose k1, k2 or k3")
        if self.rollout_batch_size % self.num_generations:
            bad("num_generations", f"must divide the completions per process and step "
                f"({self.rollout_batch_size} = per_device_train_batch_size x "
                "gradient_accumulation_steps x steps_per_generation)")
        if self.algorithm in ("grpo", "reinforce_pp_baseline") and self.num_generations < 2:
            bad("num_generations", f"{self.algorithm} compares completions of one prompt: use >= 2")
        if not 0 < self.arithmetic_test_fraction < 1:
            bad("arithmetic_test_fraction", "must be in (0, 1)")
        if self.rollout == "eager" and self.algorithm not in ("grpo", "reinforce_pp_baseline"):
            bad("rollout", "EAGER groups have variable sizes; use it with grpo or reinforce_pp_baseline")
        if self.rollout == "eager" and self.eager_entropy_top_k < 2:
            bad("eager_entropy_top_k", "must be >= 2")
        if not self.reward.strip():
            bad("reward", "name at least one reward")
        if self.reward_weights:
            try:
                weights = [float(w) for w in self.reward_weights.split(",")]
            except ValueError:
                bad("reward_weights", "must be comma-separated numbers")
            if len(weights) != len(self.outcome_rewards):
                bad("reward_weights", f"gives {len(weights)} weights for {len(self.outcome_rewards)} "
                    f"outcome rewards ({', '.join(self.outcome_rewards)})")
        if self.repro_top_k < 0:
            bad("repro_top_k", "must be >= 0")
        if not 0 <= self.repro_stability_weight <= 1:
            bad("repro_stability_weight", "must be in [0, 1]")
        if not 0 <= self.repro_ema < 1:
            bad("repro_ema", "must be in [0, 1)")
        if self.repro_micro_batch_size < 1:
            bad("repro_micro_batch_size", "must be >= 1")
        if "{answer}" not in self.repro_answer_template:
            bad("repro_answer_template", "must contain {answer}")
        if self.use_vllm and self.rollout == "eager":
            bad("rollout", "EAGER branches inside our own decoder; it cannot run on vLLM: pass --use_vllm false")
        if self.use_vllm and self.vllm_mode != "colocate":
            bad("vllm_mode", "only 'colocate' is supported (one engine inside each training process)")
        if self.vllm_importance_sampling_cap <= 0:
            bad("vllm_importance_sampling_cap", "must be > 0")
        if self.vllm_max_model_len < 0:
            bad("vllm_max_model_len", "must be >= 0 (0: prompt + completion length)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            bad("vllm_gpu_memory_utilization", "must be in (0, 1]")
        if self.use_peft and self.lora_r < 1:
            bad("lora_r", "must be >= 1")
        if self.algorithm == "ppo" and self.use_peft:
            bad("use_peft", "PPO with LoRA is not supported yet (the critic needs full weights)")

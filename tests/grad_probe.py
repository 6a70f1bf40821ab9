"""Run under `accelerate launch` (1 or 2 processes) by tests/test_distributed_exact.py: one training
step of the real trainer on a fixed global batch, split between the processes, and save the
gradient that reaches the optimizer (after DDP's all-reduce), and how many DDP wrappers outlive
`close_process_group` (none may: a live one keeps gloo's threads past the interpreter's exit).

    python tests/grad_probe.py MODEL OUT.pt ALGORITHM LOSS_TYPE SCALE_REWARDS
"""
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from algos.batch import RolloutBatch  # noqa: E402
from algos.config import RLConfig  # noqa: E402
from algos.trainer import RLTrainer  # noqa: E402
from rewards import RewardOutput  # noqa: E402
from train.cli import close_process_group  # noqa: E402
from plain_settings import PLAIN  # noqa: E402

# The global batch: 3 groups of 2. Rows 0-3 (groups 0, 1) are short, rows 4-5 (group 2) long, so
# process 0 holds 4 sequences of 2 tokens (8 tokens) and process 1 2 sequences of 24 (48 tokens).
LENGTHS = [2, 2, 2, 2, 24, 24]
SCORES = [1.0, 0.0, 0.5, 0.25, 2.0, -1.0]
SHARES = {1: [list(range(6))], 2: [[0, 1, 2, 3], [4, 5]]}


def global_batch(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    B, P, T = len(LENGTHS), 5, max(LENGTHS)
    response_mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])
    return RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.randint(3, vocab, (B, T), generator=g) * response_mask, response_mask=response_mask,
        logprobs=torch.zeros(B, T), entropies=torch.zeros(B, T), group_ids=torch.tensor([0, 0, 1, 1, 2, 2]),
        prompts=["p"] * B, completions=["c"] * B, finish_reasons=["stop"] * B, extras={"answer": ["1"] * B})


def step_gradients(model, out, algorithm, loss_type, scale) -> dict:
    """One training step of a real trainer on this process's share of the global batch; the gradient
    each parameter holds when the optimizer steps."""
    config = RLConfig(**{**PLAIN, "gradient_accumulation_steps": 2}, model_name_or_path=model, output_dir=os.path.dirname(out), algorithm=algorithm,
                      loss_type=loss_type, scale_rewards=scale, beta=0.0, num_generations=2,
                      per_device_train_batch_size=2, max_steps=1,
                      max_completion_length=24, report_to="none", num_eval_samples=0, max_grad_norm=0.0,
                      reward="accuracy")
    trainer = RLTrainer(config)
    acc = trainer.accelerator
    rows = SHARES[acc.num_processes][acc.process_index]
    batch = global_batch(trainer.policy.config.vocab_size).select(rows)
    rewards = RewardOutput(total=torch.tensor(SCORES)[rows], components={"score": torch.tensor(SCORES)[rows]})
    trainer.sample = lambda: (batch, rewards, rewards, {})
    grads = {}

    def capture(optimizer, args, kwargs):
        for name, p in trainer.policy.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()

    trainer.optimizer.optimizer.register_step_pre_hook(capture)  # the torch optimizer inside Accelerate's
    trainer.training_step()
    return grads


def live_ddp_wrappers() -> int:
    """DDP wrappers still alive; each keeps its process group (and gloo's threads) alive with it."""
    from torch.nn.parallel import DistributedDataParallel
    return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


def main(model, out, algorithm, loss_type, scale):
    grads = step_gradients(model, out, algorithm, loss_type, scale)
    main_process = not dist.is_initialized() or dist.get_rank() == 0
    close_process_group()  # frees the trainer's reference cycles (its DDP wrapper) before destroying the group
    if main_process:
        torch.save({"gradients": grads, "live_ddp_after_close": live_ddp_wrappers()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])

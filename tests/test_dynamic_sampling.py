"""Dynamic sampling (which groups are kept, resume exactness), truncated-completion masking and the
reference model's precision, on the real trainer with a tiny random Llama."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from algos.batch import RolloutBatch, concat_batches, left_pad
from algos.dynamic_sampling import first_groups, informative_groups
from algos.trainer import RLTrainer
from tests.test_trainer import REWARDS, make_config, read_metrics


def test_informative_groups_hand_computed():
    # group 4: 1, 1, 1 (all equal: dropped); group 2: 0, 1 (kept); group 9: a single row (dropped);
    # group 7: 0.5, 0.5 (dropped); group 3: -1, 0 (kept)
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.7, 0.5, 0.5, -1.0, 0.0])
    ids = torch.tensor([4, 2, 4, 2, 4, 9, 7, 7, 3, 3])
    keep = informative_groups(scores, ids)
    assert keep.tolist() == [False, True, False, True, False, False, False, False, True, True]
    # the first kept groups in order of appearance: group 2 (rows 1, 3), then group 3 (rows 8, 9)
    assert first_groups(keep, ids, 1) == [1, 3]
    assert first_groups(keep, ids, 2) == [1, 3, 8, 9]
    assert first_groups(keep, ids, 5) == [1, 3, 8, 9]


def test_concat_batches_pads_and_keeps_groups_apart():
    def batch(P, T, groups):
        B = len(groups)
        return RolloutBatch(prompt_ids=torch.full((B, P), 5), prompt_mask=torch.ones(B, P, dtype=torch.long),
                            response_ids=torch.full((B, T), 6), response_mask=torch.ones(B, T, dtype=torch.long),
                            logprobs=torch.full((B, T), -1.0), entropies=torch.ones(B, T),
                            group_ids=torch.tensor(groups), prompts=["p"] * B, completions=["c"] * B,
                            finish_reasons=["stop"] * B, extras={"answer": ["1"] * B})

    out = concat_batches([batch(2, 3, [0, 0]), batch(4, 1, [0, 1])], pad_id=0)
    assert out.prompt_ids.shape == (4, 4) and out.response_ids.shape == (4, 3)
    assert out.prompt_mask[0].tolist() == [0, 0, 1, 1]  # left padding
    assert out.response_mask[2].tolist() == [1, 0, 0] and out.logprobs[2].tolist() == [-1.0, 0.0, 0.0]
    assert out.group_ids.tolist() == [0, 0, 1, 2]  # the second batch's groups follow the first's
    assert len(out.extras["answer"]) == 4


def _dynamic(model, out, **kw):
    # a small learning rate keeps the random model's completions varied (informative odd rows)
    return make_config(model, out, reward=f"{REWARDS}:constant_for_even_rows", dynamic_sampling=True,
                       dynamic_sampling_max_rounds=6, learning_rate=1e-5, **kw)


def test_left_pad_hand_computed():
    ids, mask = left_pad([[5, 6, 7], torch.tensor([8]), []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_dynamic_sampling_keeps_informative_groups_and_resumes_exactly(tiny_model_path, tmp_path):
    full = tmp_path / "full"
    RLTrainer(_dynamic(tiny_model_path, full, max_steps=4, save_steps=2)).train()
    steps = [m for m in read_metrics(full) if "loss/policy" in m]
    assert steps[0]["dynamic_sampling/groups"] == 2.0
    for m in steps:
        # 2 prompts per step; half the prompts give all-equal rewards, so some rounds are needed
        assert 1.0 <= m["dynamic_sampling/groups"] <= 2.0
        assert 1 <= m["dynamic_sampling/rounds"] <= 6
        assert 0 < m["dynamic_sampling/informative_fraction"] <= 1
    assert any(m["dynamic_sampling/rounds"] > 1 for m in steps)
    state = json.loads((full / "final" / "trainer_state.json").read_text())
    assert state["prompts_consumed"] == 2 * sum(m["dynamic_sampling/rounds"] for m in steps)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    RLTrainer(_dynamic(tiny_model_path, resumed, max_steps=4, save_steps=2,
                       resume_from_checkpoint="latest")).train()
    again = json.loads((resumed / "final" / "trainer_state.json").read_text())
    assert again["prompts_consumed"] == state["prompts_consumed"]
    expected = {m["step"]: m for m in steps}
    for m in read_metrics(resumed):
        if "loss/policy" in m and m["step"] > 2:
            for key in ("reward/mean", "loss/policy", "dynamic_sampling/rounds"):
                assert m[key] == pytest.approx(expected[m["step"]][key], rel=1e-5, abs=1e-7), key


def test_dynamic_sampling_trains_on_what_it_has_after_the_last_round(tiny_model_path, tmp_path, capsys):
    # every group is uninformative: after 2 rounds the step trains on one (zero-advantage) group
    RLTrainer(make_config(tiny_model_path, tmp_path, max_steps=1, reward=f"{REWARDS}:zero_reward",
                          dynamic_sampling=True, dynamic_sampling_max_rounds=2)).train()
    (m,) = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/groups"] == 0
    assert m["dynamic_sampling/informative_fraction"] == 0
    assert "found 0 of 2 informative groups in 2 rounds" in capsys.readouterr().out


@pytest.mark.parametrize("algorithm, rollout", [("ppo", "hf"), ("reinforce_pp", "hf"), ("grpo", "eager")])
def test_dynamic_sampling_with_a_critic_without_groups_baselines_and_with_eager_rollouts(
        tiny_model_path, tmp_path, algorithm, rollout):
    """On by default, so it must compose with PPO's critic, REINFORCE++'s batch baseline and EAGER's
    variable-size groups: the kept groups train and the prompt position advances by the rounds run."""
    extra = {"eager_mode": "init", "eager_threshold": -1.0} if rollout == "eager" else {}
    RLTrainer(_dynamic(tiny_model_path, tmp_path, algorithm=algorithm, rollout=rollout, max_steps=2,
                       **extra)).train()
    steps = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 1 <= m["dynamic_sampling/rounds"] <= 6 and 1.0 <= m["dynamic_sampling/groups"] <= 2.0
        assert torch.isfinite(torch.tensor(m["loss/policy"])) and m["grad_norm"] > 0
    state = json.loads((tmp_path / "final" / "trainer_state.json").read_text())
    assert state["prompts_consumed"] == 2 * sum(m["dynamic_sampling/rounds"] for m in steps)


def test_mask_truncated_completions(tiny_model_path, tmp_path):
    trainer = RLTrainer(make_config(tiny_model_path, tmp_path, mask_truncated_completions=True))
    B, T = 3, 4
    batch = RolloutBatch(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                         response_ids=torch.ones(B, T, dtype=torch.long),
                         response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
                         logprobs=torch.zeros(B, T), entropies=torch.zeros(B, T), group_ids=torch.tensor([0, 0, 0]),
                         finish_reasons=["stop", "length", "stop"])
    assert trainer.loss_mask(batch).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    trainer.config.mask_truncated_completions = False
    assert trainer.loss_mask(batch).tolist() == batch.response_mask.float().tolist()
    # in training: every completion of a 1-token budget is truncated, so nothing is left to learn from
    out = tmp_path / "run"
    RLTrainer(make_config(tiny_model_path, out, max_steps=1, max_completion_length=1,
                          mask_truncated_completions=True)).train()
    (m,) = [m for m in read_metrics(out) if "loss/policy" in m]
    assert m["loss/masked_truncated_fraction"] == pytest.approx(1.0, abs=0.2)
    if m["loss/masked_truncated_fraction"] == 1.0:
        assert m["loss/policy"] == 0.0 and m["grad_norm"] == 0.0


def test_bf16_reference_matches_the_policy_at_step_0(tiny_model_path, tmp_path, fresh_accelerate_state):
    """Under --bf16 the reference runs in the policy's precision: at identical weights the KL is 0
    (in fp32 the reference left a 0.03 nat/token gap against the autocast policy)."""
    RLTrainer(make_config(tiny_model_path, tmp_path, max_steps=1, bf16=True, beta=0.1)).train()
    (m,) = [m for m in read_metrics(tmp_path) if "loss/policy" in m]
    assert m["kl"] == 0.0

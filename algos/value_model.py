"""The PPO critic: a copy of the policy's backbone with a scalar value head."""
from __future__ import annotations

import copy

from torch import nn


class ActorCritic(nn.Module):
    """Policy and critic in one module, so one optimizer and one Accelerate/DeepSpeed engine
    train both. The critic is initialised from the policy (backbone copy + zero value head)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.critic_backbone = copy.deepcopy(policy.get_decoder())
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int):
        """(policy logits of the last ``logits_to_keep`` positions, values at the same positions)."""
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, logits_to_keep=logits_to_keep,
                             use_cache=False).logits
        hidden = self.critic_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False).last_hidden_state
        values = self.value_head(hidden[:, -logits_to_keep:]).squeeze(-1)
        return logits, values.float()

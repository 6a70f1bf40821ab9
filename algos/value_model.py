"""The PPO critic: a scalar value head on the policy's backbone, shared or copied."""
from __future__ import annotations

from torch import nn

from algos.shared_prompt import shared_prompt_forward


class ActorCritic(nn.Module):
    """Policy and critic in one module, so one optimizer and one Accelerate/DeepSpeed engine
    train both. The value head starts at zero.

    With ``critic_backbone`` (verl/OpenRLHF style: the policy's decoder loaded a second time, by the
    caller) the critic is trained separately (twice the compute and memory). Without it (TRL's
    classic value-head model) the head reads the policy's last hidden states, so one forward pass
    gives logits and values and the value loss also shapes the shared backbone. The caller loads
    the copy rather than this class deep-copying the policy: under DeepSpeed ZeRO-3 a deep copy
    leaves parameters that the engine partitions to zero elements."""

    def __init__(self, policy: nn.Module, critic_backbone: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.shared_backbone = critic_backbone is None
        self.critic_backbone = critic_backbone
        # In the policy's dtype: a policy built under ZeRO-3's zero.Init holds bf16 shards that DeepSpeed
        # does not cast again, and its optimizer needs one dtype across the parameters it flattens.
        dtype = next(policy.parameters()).dtype
        self.value_head = nn.Linear(policy.config.hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def critic_parameters(self) -> list[nn.Parameter]:
        own = [] if self.critic_backbone is None else list(self.critic_backbone.parameters())
        return own + list(self.value_head.parameters())

    def forward(self, input_ids, attention_mask, position_ids, keep: int, logits_to_keep=None, split=None):
        """(the policy's output, values (B, keep) at the last ``keep`` positions). ``logits_to_keep``
        is passed to the policy (default ``keep``); the output carries the hidden states when it is an
        index (an empty one: no logits, the caller chunks the output layer) or the critic shares the backbone.

        ``split``: the same rows as ``(prompt_ids, prompt_mask, response_ids, response_mask, prompts)``
        with ``prompts`` from ``algos.shared_prompt.distinct_prompts``; the policy then runs each distinct
        prompt once and its completions on that prompt's KV cache (``shared_prompt_forward``: hidden states
        of the last ``keep`` positions, no logits); a separate critic's backbone does the same."""
        if split is not None:
            out = shared_prompt_forward(self.policy, *split[:4], prompts=split[4])
        else:
            logits_to_keep = keep if logits_to_keep is None else logits_to_keep
            want_hidden = self.shared_backbone or not isinstance(logits_to_keep, int)
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, logits_to_keep=logits_to_keep,
                              use_cache=False, output_hidden_states=want_hidden)
        if self.shared_backbone:
            hidden = out.hidden_states[-1]
        elif split is not None:
            hidden = shared_prompt_forward(self.critic_backbone, *split[:4], prompts=split[4],
                                           bare_decoder=True).hidden_states[-1]
        else:
            hidden = self.critic_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False).last_hidden_state
        values = self.value_head(hidden[:, -keep:]).squeeze(-1)
        return out, values.float()

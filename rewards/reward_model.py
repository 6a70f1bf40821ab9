"""A sequence-classification model as a reward, scored as TRL's ``GRPOTrainer`` scores one
(``trl/trainer/grpo_trainer.py``: loading in ``__init__``, scoring in ``_calculate_rewards``).

The model loads with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` and
its own tokenizer (pad token = EOS when it has none; the model's ``pad_token_id`` follows it, since
the classifier reads the last non-pad token). Conversational data: the prompt messages plus the
completion message through the reward tokenizer's chat template; standard data: prompt + completion
text. Right-padded, no special tokens added; the reward is ``logits[:, 0]``.
"""
from __future__ import annotations

import os

import torch

from .registry import RewardConfigError

__all__ = ["SequenceClassifierReward"]


class SequenceClassifierReward:
    """Callable with TRL's reward signature; ``__name__`` is the model's last path part (as TRL)."""

    def __init__(self, name_or_path: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1)
        except Exception as exc:  # hub, file and config errors come in many types
            raise RewardConfigError(
                f"reward {name_or_path!r} is no registered name, 'module:function' or loadable "
                f"sequence-classification model ({type(exc).__name__}: {' '.join(str(exc).split()).split('. ')[0]})"
            ) from exc
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)
        self.__name__ = os.path.basename(str(name_or_path).rstrip("/"))

    def _texts(self, prompts, completions) -> list[str]:
        if prompts and isinstance(prompts[0], list):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RewardConfigError(f"reward model {self.__name__!r} has no chat template, which "
                                        "conversational prompts need; use text prompts or another model")
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.model.to(device)
        enc = self.tokenizer(self._texts(prompts, completions), return_tensors="pt", padding=True,
                             padding_side="right", add_special_tokens=False).to(device)
        return self.model(**enc).logits[:, 0].float().cpu().tolist()

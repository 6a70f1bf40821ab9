"""A reward file in verl's ``custom_reward_function`` style, shaped like verl's rule-based scorers
(``verl/utils/reward_score/gsm8k.py``): the last number in the response against the ground truth.
Returns verl's dict form: ``score`` 1.0 when right, 0.1 for a wrong number, 0.0 without one."""
import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    numbers = re.findall(r"-?\d+(?:\.\d+)?", solution_str.replace(",", ""))
    if not numbers:
        return {"score": 0.0, "acc": 0.0}
    right = numbers[-1] == str(ground_truth)
    return {"score": 1.0 if right else 0.1, "acc": float(right)}

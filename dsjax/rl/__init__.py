"""Reinforcement learning with GRPO and rule-based rewards (DeepSeekMath, DeepSeek-R1)."""

from dsjax.rl.grpo import GRPOConfig, aggregate, group_advantages, grpo_loss, k3_kl, per_token_objective
from dsjax.rl.rewards import (
    Reward,
    accuracy_reward,
    countdown_reward,
    extract_answer,
    format_reward,
    score,
    tag_count_reward,
)
from dsjax.rl.tasks import ArithmeticTask, CountdownTask, JsonlTask, Problem, load_jsonl

__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "GRPOConfig",
    "JsonlTask",
    "Problem",
    "Reward",
    "accuracy_reward",
    "aggregate",
    "countdown_reward",
    "extract_answer",
    "format_reward",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "load_jsonl",
    "per_token_objective",
    "score",
    "tag_count_reward",
]

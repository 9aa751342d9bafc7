"""Reinforcement learning with GRPO and its variants (DAPO, Dr. GRPO, GSPO) and rule-based rewards (DeepSeekMath,
DeepSeek-R1)."""

from dsjax.rl.grpo import (
    GRPOConfig,
    aggregate,
    group_advantages,
    grpo_loss,
    importance_ratio,
    k3_kl,
    overlong_penalty,
    per_token_objective,
    sequence_mean,
    tis_weights,
)
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
    "importance_ratio",
    "k3_kl",
    "load_jsonl",
    "overlong_penalty",
    "per_token_objective",
    "score",
    "sequence_mean",
    "tag_count_reward",
    "tis_weights",
]

"""DeepSeek-Coder: sandboxed execution, code evaluation, infilling."""

from dsjax.coder.humaneval import Problem, program, read_problems, truncate_completion
from dsjax.coder.passk import mean_pass_at_k, pass_at_k
from dsjax.coder.sandbox import RunResult, Sandbox, SandboxConfig, SandboxError, run_programs
from dsjax.coder.tasks import CodeTask

__all__ = [
    "CodeTask",
    "Problem",
    "RunResult",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "mean_pass_at_k",
    "pass_at_k",
    "program",
    "read_problems",
    "run_programs",
    "truncate_completion",
]

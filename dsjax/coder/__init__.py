"""DeepSeek-Coder: sandboxed execution, code evaluation, infilling."""

from dsjax.coder.humaneval import Problem, program, read_problems, truncate_completion
from dsjax.coder.sandbox import RunResult, Sandbox, SandboxConfig, SandboxError, run_programs

__all__ = [
    "Problem",
    "RunResult",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "program",
    "read_problems",
    "run_programs",
    "truncate_completion",
]

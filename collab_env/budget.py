"""Cloud-budget accounting (paper v3 eq. 1: E[cloud calls] <= rho * E[local answers]).

One `CloudBudget` counts the episodes and cloud calls of a window. In `cap` mode it refuses a
call that would break the budget; the episode is then scored on the device's local answer
(the paper redirects over-budget requests to the device; paper-spec section 5.5).
"""

from __future__ import annotations

import math

import numpy as np

from collab_env.config import BudgetConfig

_TOLERANCE = 1e-9


class CloudBudget:
    """Counts of the current window, and the admission rule of `cap` mode."""

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self.calls = 0
        self.episodes = 0

    def reset_window(self) -> None:
        self.calls = 0
        self.episodes = 0

    def _window_full(self) -> bool:
        return self.config.window is not None and self.episodes >= self.config.window

    def would_admit(self) -> bool:
        """Whether a call for help in the next episode would reach the cloud (nothing is counted)."""
        if self.config.mode != "cap":
            return True
        calls, episodes = (0, 0) if self._window_full() else (self.calls, self.episodes)
        share = self.config.share
        if self.config.window is None:
            return calls + 1 <= share * (episodes + 1) + _TOLERANCE
        return calls + 1 <= math.floor(share * self.config.window + _TOLERANCE)

    def record(self, wants_cloud: bool) -> bool:
        """Count one finished episode; return whether its call for help is admitted."""
        admitted = wants_cloud and self.would_admit()
        if self._window_full():
            self.reset_window()
        self.episodes += 1
        self.calls += int(admitted)
        return admitted

    @property
    def used_share(self) -> float:
        return self.calls / self.episodes if self.episodes else 0.0

    def observation(self) -> np.ndarray:
        """[target share rho/(1+rho), share of this window's episodes that used the cloud]."""
        return np.array([self.config.share, self.used_share], dtype=np.float32)

    def snapshot(self, over_budget: bool = False) -> dict[str, float | int | bool]:
        return {
            "calls": self.calls,
            "episodes": self.episodes,
            "ratio": self.used_share,
            "over_budget": over_budget,
        }

    def penalty(self, used_cloud: bool) -> float:
        """The Lagrangian cost of this episode's call in `penalty` mode (v3 App. B eq. 11), else 0."""
        return self.config.penalty if used_cloud and self.config.mode == "penalty" else 0.0

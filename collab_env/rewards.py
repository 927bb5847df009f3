"""The hierarchical reward (paper-spec section 3).

v3 (eq. 18, the default):   alpha_a  if the device's own answer is correct
                            alpha_c  if the device called for help and the cloud's answer is correct
                            0        otherwise
v1 (eq. 5) adds the format reward: alpha_a + alpha_f for a correct local answer in the required
format, alpha_a without it, alpha_f for a wrong local answer in format, alpha_c for a correct
cloud answer, 0 otherwise. A call refused by the test-time cap is scored on the local answer.
"""

from __future__ import annotations

from collab_env.config import RewardConfig


def hierarchical_reward(
    config: RewardConfig,
    *,
    used_cloud: bool,
    local_correct: bool,
    cloud_correct: bool | None,
    follows_format: bool = False,
) -> float:
    """Reward of one finished episode (paper v3 eq. 18, or v1 eq. 5 when `config.version == "v1"`)."""
    if used_cloud:
        return config.alpha_c if cloud_correct else 0.0
    reward = config.alpha_a if local_correct else 0.0
    if config.version == "v1" and follows_format:
        reward += config.alpha_f
    return reward

"""DeviceCloud in other trainers: `trl.EnvReward` (a reward function for TRL's GRPOTrainer) and
`verl.compute_score` (a verl custom reward function for parquet files written by `collab_env.export`).

Neither module imports its trainer: TRL and verl call them. See docs/integrations.md.
"""

from __future__ import annotations

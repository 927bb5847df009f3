"""Train a model with TRL's GRPOTrainer on DeviceCloud-v0's reward, for a few steps on a CPU.

    python examples/trl_grpo.py                                  # SmolLM2-135M-Instruct (embedded), 2 steps
    python examples/trl_grpo.py --device tiny-random --steps 2   # a tiny random model: seconds
    python examples/trl_grpo.py --gapg                           # GAPG's filter and weights on TRL's batch

The dataset is the env's own task (`collab_env.tasks.to_dataset`), the reward `EnvReward(env)`: every
completion TRL samples is scored by the env (marker, verifier, cloud oracle and its cache, budget),
from the sampled token ids. The device model is the policy, so the env's tokenizer is the model's.
With `--gapg`, the trainer replaces TRL's advantages by GAPG's (v3 eq. 2) on the prompts GAPG's filter
keeps (Set 1 and up to rho |Set 1| of Set 2, Alg. 1 lines 11-12) and 0 elsewhere; see
docs/integrations.md. Needs `pip install 'devicecloud[trl]'` (`bash scripts/setup.sh` installs it).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import collab_env  # noqa: F401  (registers DeviceCloud-v0)
from agents.gapg import gapg_weights, select_prompts
from collab_env.integrations.trl import EnvReward
from collab_env.models import load_model
from collab_env.tasks import to_dataset
from collab_env.tasks.records import require


def gapg_advantages(
    rewards: Sequence[float],
    infos: Sequence[dict[str, Any]],
    num_generations: int,
    rho: float,
    rng: np.random.Generator,
    set1_rule: str = "any_local_correct",
    set2_order: str = "random",
) -> tuple[torch.Tensor, list[int], list[int]]:
    """GAPG's per-completion advantages for a batch in TRL's layout (flat, each prompt's
    `num_generations` completions consecutive): `gapg_weights` on the prompts `select_prompts` keeps,
    scaled by prompts / |kept| so that TRL's `loss_type="dr_grpo"` (a constant normaliser) gives GAPG's
    per-prompt average (v3 eq. 5) up to a constant; 0 on the other prompts. Returns the advantages
    and Set 1 and Set 2 (prompt indices of the batch)."""
    shape = (-1, num_generations)
    grouped = torch.tensor(rewards, dtype=torch.float32).view(shape)
    local = torch.tensor([bool(i["local_correct"]) for i in infos]).view(shape)
    cloud = torch.tensor([bool(i["cloud_correct"]) for i in infos]).view(shape)
    set1, set2, _ = select_prompts(local, cloud, rho, set1_rule, set2_order, rng)
    kept = torch.zeros(grouped.shape[0], 1)
    kept[sorted(set1 + set2)] = grouped.shape[0] / max(len(set1) + len(set2), 1)
    return (gapg_weights(grouped) * kept).flatten(), set1, set2


def gapg_trainer(trainer_class: type, reward: EnvReward, rho: float, seed: int = 0) -> type:
    """A subclass of TRL's GRPOTrainer whose advantages are `gapg_advantages` of each generation batch
    (one process: TRL gathers rewards across processes, `reward.last_infos` holds only this one's)."""

    class GAPGFilteredTrainer(trainer_class):
        def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
            out = super()._generate_and_score_completions(inputs)
            rng = np.random.default_rng([seed, self.state.global_step])
            advantages, set1, set2 = gapg_advantages(
                reward.last_rewards, reward.last_infos, self.num_generations, rho, rng
            )
            out["advantages"] = advantages.to(out["advantages"].device)
            logged = self._logs["advantages"]  # TRL's completions table: show the advantages trained on
            for _ in range(min(len(advantages), len(logged))):
                logged.pop()
            logged.extend(advantages.tolist())
            self._metrics["train"]["gapg/set1"].append(float(len(set1)))
            self._metrics["train"]["gapg/set2"].append(float(len(set2)))
            return out

    return GAPGFilteredTrainer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="smollm2", help="smollm2 or tiny-random (the policy and the env's tokenizer)"
    )
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument(
        "--generations", type=int, default=4, help="completions per prompt (TRL's num_generations)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="env max_new_tokens = TRL max_completion_length"
    )
    parser.add_argument("--train-prompts", type=int, default=200, help="size of the training split")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--gapg", action="store_true", help="GAPG's filter and weights instead of TRL's advantages"
    )
    parser.add_argument(
        "--output-dir", default=None, help="TRL's output directory (default: a temporary one)"
    )
    parser.add_argument("--cloud-cache", default=":memory:", help="the simulated cloud's answer cache")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> tuple[Any, EnvReward]:
    """Train; returns TRL's trainer and the reward function (its `stats()` and last batch)."""
    args = parse_args(argv)
    trl = require("trl", "examples/trl_grpo.py")
    env = gym.make(
        "DeviceCloud-v0",
        task={"name": "arithmetic", "num_train": args.train_prompts, "num_test": 20},
        device={"name": args.device, "dtype": "float32"},
        cloud={"name": "simulated", "cache_path": args.cloud_cache},
        max_new_tokens=args.max_new_tokens,
    )
    reward = EnvReward(env)
    model = load_model({"name": args.device, "dtype": "float32"})
    # TRL adjusts its tokenizer (padding side); the env's is shared between envs and stays as it is.
    tokenizer = copy.deepcopy(env.unwrapped.tokenizer)
    config = trl.GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="devicecloud-trl-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        beta=0.0,
        loss_type="dr_grpo" if args.gapg else "dapo",
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer_class = trl.GRPOTrainer
    if args.gapg:
        trainer_class = gapg_trainer(trainer_class, reward, rho=env.unwrapped.budget.config.ratio)
    trainer = trainer_class(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=to_dataset(env.unwrapped.task, "train"),
        processing_class=tokenizer,
    )
    trainer.train()
    stats = reward.stats()
    print(
        f"{stats['completions']:.0f} completions scored by the env: accuracy {stats['accuracy']:.2f}, "
        f"call rate {stats['call_rate']:.2f}, outcomes "
        + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in stats.items() if k.startswith("outcome/"))
    )
    return trainer, reward


if __name__ == "__main__":
    main()

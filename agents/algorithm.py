"""What an algorithm is to the shared training loop, and the update loop every algorithm shares.

An algorithm does two things, each in one short function of its own module:
- `prepare(rollout)`: choose the sequences to learn from and attach per-token `advantages` and
  loss coefficients `coef` (N, Lc) to the batch, such that the batch objective is
  sum(coef * per-token term). Normalisers (per prompt, per sequence, per token) live in `coef`,
  so splitting a batch into micro-batches changes nothing.
- `loss(out, batch)`: the objective on one micro-batch, as a scalar plus metrics.
An algorithm with state of its own across steps (DA-GRPO's multiplier) also overrides
`state_dict` / `load_state_dict`, which the trainer saves in and restores from checkpoints.

`update()` below runs epochs, minibatches (one optimizer step each) and gradient accumulation
for every algorithm alike.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from agents import distributed
from agents.batch import Rollout
from agents.config import TrainConfig
from agents.policy import HelpChoices, Policy, PolicyOutput, shared_start
from agents.precision import stepped_parameters
from collab_env.config import BudgetConfig
from collab_env.errors import ConfigError


class Algorithm(ABC):
    """Base of GAPG, GRPO and PPO: the trainer calls `prepare`, then `update` calls `loss`."""

    needs_values = False
    needs_entropy = False
    needs_reference = False
    needs_decision = False
    """True: `loss` gets `PolicyOutput.decision_logprobs`, the help decision's part of log pi."""
    only_advantage_terms = False
    """True when every term of `loss` is a token's advantage times something (no value, entropy or KL
    term): a row whose advantage is zero at every token then adds exactly zero to the loss and to
    every gradient, and `update` does not compute it (`rows_that_learn`)."""

    def __init__(
        self,
        config: Any,
        train: TrainConfig,
        budget: BudgetConfig,
        seed: int,
        max_new_tokens: int,
        help_choices: HelpChoices | None = None,
    ) -> None:
        self.config = config
        self.train = train
        self.budget = budget
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.help_choices = help_choices
        if self.needs_decision and help_choices is None:
            raise ConfigError(
                f"{type(self).__name__} with these settings treats the help decision apart and needs the "
                "env's help choices: pass help_choices=HelpChoices.of(env.unwrapped.help_branches())."
            )

    @property
    def decision_choices(self) -> HelpChoices | None:
        """What the policy needs to split log pi into decision and content, when this algorithm uses it."""
        return self.help_choices if self.needs_decision else None

    def state_dict(self) -> dict[str, Any]:
        """What the algorithm carries from step to step (e.g. a Lagrange multiplier), JSON-serialisable:
        saved in each checkpoint's state.json under "algorithm" and given to `load_state_dict` on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (an empty dict for a checkpoint written without it)."""

    @abstractmethod
    def prepare(
        self, rollout: Rollout, step: int, policy: Policy, reference: Policy | None
    ) -> tuple[Rollout | None, dict[str, float]]:
        """The batch to learn from with `advantages` and `coef` in `extras` (None: skip this update)."""

    @abstractmethod
    def loss(self, out: PolicyOutput, batch: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on a micro-batch; summing it over micro-batches gives the batch objective."""


def trimmed(batch: Rollout) -> Rollout:
    """Drop the padding columns no row of this micro-batch uses (left of prompts, right of completions)."""
    used = batch.attention_mask.any(0).nonzero()
    prompt_len = batch.input_ids.shape[1] - batch.completion_len
    first = int(used[0]) if len(used) else 0
    completion = int(batch.completion_mask.any(0).nonzero().max()) + 1 if batch.completion_mask.any() else 1
    lc = batch.completion_len

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:, :completion] if t.dim() == 2 and t.shape[1] == lc else t

    return Rollout(
        prompt_ids=batch.prompt_ids,
        groups=batch.groups,
        group_size=batch.group_size,
        input_ids=batch.input_ids[:, first : prompt_len + completion],
        attention_mask=batch.attention_mask[:, first : prompt_len + completion],
        completion_mask=batch.completion_mask[:, :completion],
        old_logprobs=batch.old_logprobs[:, :completion],
        rewards=batch.rewards,
        infos=batch.infos,
        extras={k: cut(v) for k, v in batch.extras.items()},
    )


def by_length(batch: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """`rows` ordered by completion length, then prompt length, so a micro-batch of neighbours trims
    most of its padding (a sum over rows does not depend on their order)."""
    completion = batch.completion_mask[rows].sum(dim=1)
    prompt = batch.attention_mask[rows, : batch.input_ids.shape[1] - batch.completion_len].sum(dim=1)
    key = completion.long() * (batch.input_ids.shape[1] + 1) + prompt
    return rows[torch.argsort(key, stable=True)]


def by_group(batch: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """`rows` group by group, the groups ordered by their longest completion and each group's rows
    by length, so a micro-batch holds whole groups, whose prompt `Policy.forward` computes once."""
    completion = batch.completion_mask.sum(dim=1).long()
    group = batch.groups.long()
    longest = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_reduce(0, group, completion, "amax")
    width = batch.completion_len + 1
    key = (longest[group[rows]] * (int(group.max()) + 1) + group[rows]) * width + completion[rows]
    return rows[torch.argsort(key, stable=True)]


def forward_cost(batch: Rollout, rows: torch.Tensor, size: int, head_cost: float) -> float:
    """Columns the model computes for micro-batches of `size` taken from `rows` in this order, as
    `Policy.forward` computes them: each distinct prompt's part after the start all rows share once,
    then every row's completion, padded to the micro-batch's longest (`head_cost`: the LM head's
    extra cost per completion column, `Policy.head_cost`)."""
    prompt_width = batch.input_ids.shape[1] - batch.completion_len
    lengths = batch.attention_mask[:, :prompt_width].sum(dim=1)
    start = shared_start(batch.input_ids, prompt_width - lengths, int(lengths.min()))
    completion = batch.completion_mask.sum(dim=1)
    cost = 0.0
    for index in rows.split(size):
        prompts = len(batch.groups[index].unique())
        own = int(lengths[index].max()) - start
        cost += prompts * own + len(index) * int(completion[index].max()) * (1 + head_cost)
    return cost


def micro_batch_order(batch: Rollout, rows: torch.Tensor, size: int, head_cost: float) -> torch.Tensor:
    """`rows` in whichever order costs less to compute in micro-batches of `size` (`forward_cost`):
    by length, which pads least, or group by group, which computes each prompt once."""
    return min(
        (by_length(batch, rows), by_group(batch, rows)), key=lambda o: forward_cost(batch, o, size, head_cost)
    )


def micro_batches(batch: Rollout, rows: torch.Tensor, size: int, device: torch.device) -> Iterator[Rollout]:
    """Trimmed micro-batches of `rows`, moved to `device`."""
    for start in range(0, len(rows), size):
        sub = trimmed(batch.select(rows[start : start + size]))
        yield Rollout(
            prompt_ids=sub.prompt_ids,
            groups=sub.groups,
            group_size=sub.group_size,
            input_ids=sub.input_ids.to(device),
            attention_mask=sub.attention_mask.to(device),
            completion_mask=sub.completion_mask.to(device),
            old_logprobs=sub.old_logprobs.to(device),
            rewards=sub.rewards.to(device),
            infos=sub.infos,
            extras={k: v.to(device) for k, v in sub.extras.items()},
        )


@torch.no_grad()
def score_batch(
    policy: Policy,
    batch: Rollout,
    micro_batch_size: int,
    with_values: bool = False,
    help_choices: HelpChoices | None = None,
) -> PolicyOutput:
    """Log-probabilities (and values, and decision log-probabilities) of every completion token under
    `policy`, without gradients."""
    rows = micro_batch_order(batch, torch.arange(len(batch.prompt_ids)), micro_batch_size, policy.head_cost)
    logprobs = torch.zeros_like(batch.old_logprobs)
    values = torch.zeros_like(batch.old_logprobs) if with_values else None
    decision = torch.zeros_like(batch.old_logprobs) if help_choices is not None else None
    for start in range(0, len(rows), micro_batch_size):
        index = rows[start : start + micro_batch_size]
        sub = trimmed(batch.select(index))
        out = policy(
            sub.input_ids.to(policy.device),
            sub.attention_mask.to(policy.device),
            sub.completion_len,
            help_choices=help_choices,
        )
        logprobs[index, : sub.completion_len] = out.logprobs.cpu()
        if values is not None and out.values is not None:
            values[index, : sub.completion_len] = out.values.cpu()
        if decision is not None and out.decision_logprobs is not None:
            decision[index, : sub.completion_len] = out.decision_logprobs.cpu()
    mask = batch.completion_mask
    return PolicyOutput(logprobs * mask, None, values, None if decision is None else decision * mask)


def rows_that_learn(batch: Rollout) -> Rollout:
    """The rows with a non-zero advantage at some token; the whole batch if there are none, since
    AdamW still steps on zero gradients (momentum and weight decay), which needs every gradient."""
    learning = batch.extras["advantages"].ne(0).any(dim=1)
    if not learning.any():
        return batch
    return batch.select(learning.nonzero().flatten())


def single_update(algorithm: Algorithm) -> bool:
    """One optimizer step per batch: the policy that sampled is the one being differentiated, so the
    log-probabilities of the sampling policy are the detached current ones (no scoring pass)."""
    return algorithm.config.epochs == 1 and algorithm.config.minibatches == 1


def update(
    algorithm: Algorithm,
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    batch: Rollout,
    generator: torch.Generator,
    old_from_policy: bool = False,
) -> dict[str, float]:
    """Epochs x minibatches of optimizer steps on `batch`, with gradient accumulation over micro-batches.

    Under torch.distributed each rank differentiates its share of every minibatch and the gradients
    are summed (the loss coefficients already normalise over the whole batch). `old_from_policy`
    takes the old log-probabilities from the forward pass itself, detached: exact for a single
    update (`single_update`) on a batch the current policy sampled.
    """
    config, train = algorithm.config, algorithm.train
    if train.skip_zero_advantage_rows and algorithm.only_advantage_terms and config.minibatches == 1:
        # Groups whose samples all earned the same reward (all right, all wrong) have zero advantage:
        # often a third of a batch or more, forwarded and differentiated for nothing.
        batch = rows_that_learn(batch)
    n = len(batch.prompt_ids)
    totals: dict[str, float] = {}
    grad_norms = []
    params = stepped_parameters(optimizer)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator) if config.minibatches > 1 else torch.arange(n)
        for rows in order.chunk(config.minibatches):
            optimizer.zero_grad(set_to_none=True)
            own = torch.as_tensor(distributed.shard(rows.tolist()), dtype=torch.long)
            own = micro_batch_order(batch, own, train.micro_batch_size, policy.head_cost)
            for micro in micro_batches(batch, own, train.micro_batch_size, policy.device):
                out = policy(
                    micro.input_ids,
                    micro.attention_mask,
                    micro.completion_len,
                    with_entropy=algorithm.needs_entropy,
                    help_choices=algorithm.decision_choices,
                )
                if old_from_policy:
                    micro.old_logprobs = out.logprobs.detach()
                loss, metrics = algorithm.loss(out, micro)
                # coef normalises over the whole batch; a minibatch is one of `minibatches` equal parts.
                (loss * config.minibatches).backward()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
            distributed.all_reduce_gradients(params)
            max_norm = train.max_grad_norm if train.max_grad_norm > 0 else math.inf
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            optimizer.step()
    totals = distributed.sum_metrics(totals, str(policy.device))
    # Metrics are coef-weighted sums, so one pass over all minibatches adds up to the batch value.
    result = {key: value / config.epochs for key, value in totals.items()}
    result["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
    result["train/rows_computed"] = float(n)
    return result

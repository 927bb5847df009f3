"""GAPG's decoupled help decision: log pi = decision + content, exactly; the decision's weight and a
content-only KL anchor, by hand and in two trainer steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_train_smoke import compose_experiment, judge_first_token

from agents.config import TrainConfig
from agents.distributed import QuietLog
from agents.gapg import GAPG, GAPGConfig, gapg_loss
from agents.policy import HelpChoices, Policy, PolicyOutput, decision_logprobs
from agents.registry import make_algorithm
from agents.trainer import Trainer
from collab_env.config import BudgetConfig, DeviceConfig
from collab_env.errors import ConfigError
from collab_env.models import load_model, load_tokenizer

TINY = DeviceConfig(name="tiny-random")


def _trace_env(make_env):
    """numbered_steps opens the marker anywhere (two help tokens, '<' and ' <', at every position)."""
    return make_env(device=TINY, task={"name": "arithmetic", "template": "numbered_steps"}, split="test")


def test_decision_and_content_add_up_to_log_pi_by_brute_force(make_env):
    env = _trace_env(make_env)
    policy = Policy(load_model(TINY), load_tokenizer("tiny-random"))
    choices = HelpChoices.of(env.unwrapped.help_branches())
    assert len(choices.tokens) == 2 and all(b.prefix == () for b in choices.branches)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.tensor(env.unwrapped.prompt_tokens(env.unwrapped.task.problems("test")[0].id))
    completions = torch.randint(0, policy.vocab_size, (3, 6), generator=generator)
    completions[1, 2] = choices.tokens[0]  # row 1 calls at position 2, row 2 at its last position
    completions[2, 5] = choices.tokens[1]
    ids = torch.cat([prompt.repeat(3, 1), completions], 1)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # row 0 wrote four tokens
    with torch.no_grad():
        out = policy(ids, mask, 6, help_choices=choices)
        logits = policy.model(ids, attention_mask=mask).logits[:, -7:-1, : policy.vocab_size].float()
    probs = logits.softmax(-1)
    p_help = probs[..., list(choices.tokens)].sum(-1)
    called = torch.isin(completions, torch.tensor(choices.tokens))
    expected = torch.where(called, p_help.log(), (1 - p_help).log())
    expected[0, -2:] = 0  # nothing written there: no decision
    torch.testing.assert_close(out.decision_logprobs, expected, atol=1e-5, rtol=1e-4)
    content = out.logprobs - out.decision_logprobs
    taken = probs.gather(-1, completions[..., None]).squeeze(-1)
    # Not calling: the token's probability among the tokens that do not call; calling: among the help tokens.
    torch.testing.assert_close(content[~called], (taken / (1 - p_help)).log()[~called], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(content[called], (taken / p_help).log()[called], atol=1e-5, rtol=1e-4)


def _logits_with_help_bias(bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Random logits (2, 5, 7) whose help tokens 3 and 4 get `bias`; help open everywhere but (1, 4)."""
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([3, 4])
    logits = logits + bias * torch.isin(torch.arange(7), tokens)
    targets = torch.tensor([[0, 3, 1, 2, 4], [5, 6, 0, 1, 3]])
    open_tokens = torch.ones(2, 5, 2, dtype=torch.bool)
    open_tokens[1, 4] = False  # token 3 written where no branch is open: content, not a call
    log_norm = logits.logsumexp(-1)
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - log_norm
    return logprobs, decision_logprobs(logits, log_norm, targets, tokens, open_tokens)


def test_a_bias_on_the_help_logits_moves_the_decision_and_not_the_content():
    base_lp, base_d = _logits_with_help_bias(torch.tensor(0.0))
    lp, d = _logits_with_help_bias(torch.tensor(1.5))
    assert base_d[1, 4] == 0 and d[1, 4] == 0  # no branch open: all of log pi is content
    assert (d - base_d).abs()[:, :4].min() > 1e-3  # every open decision moved
    # Where the help action is open, the content did not: a content anchor sees nothing of the bias.
    torch.testing.assert_close((lp - d)[:, :4], (base_lp - base_d)[:, :4])


@pytest.mark.parametrize(("help_weight", "moves"), [(0.0, False), (1.0, True), (3.0, True)])
def test_help_weight_scales_the_decisions_gradient(help_weight, moves):
    """With help_weight 0 the loss no longer depends on the help logits; above 0 its gradient there is
    help_weight times the decision's."""
    algorithm = GAPG(
        GAPGConfig(help_weight=help_weight),
        TrainConfig(),
        BudgetConfig(),
        0,
        5,
        help_choices=HelpChoices((3, 4), ()),
    )
    advantages, coef = torch.tensor([[0.5], [-0.5]]).expand(2, 5), torch.full((2, 5), 0.5)
    coef[1, 4] = 0  # where no branch is open the bias is on ordinary tokens: leave that position out
    bias = torch.tensor(0.0, requires_grad=True)
    lp, d = _logits_with_help_bias(bias)
    batch = SimpleNamespace(extras={"advantages": advantages, "coef": coef})  # all that the loss reads
    loss, _ = algorithm.loss(PolicyOutput(lp, decision_logprobs=d), batch)
    (grad,) = torch.autograd.grad(loss, bias, retain_graph=True)
    (decision_grad,) = torch.autograd.grad(gapg_loss(d, advantages, coef), bias)
    assert (abs(float(grad)) > 1e-4) is moves
    assert float(grad) == pytest.approx(help_weight * float(decision_grad), abs=1e-6)


def test_decoupled_settings_are_checked_and_need_the_help_choices():
    with pytest.raises(ConfigError, match="agent.kl_anchor_scope"):
        GAPGConfig(kl_anchor_scope="answers")
    with pytest.raises(ConfigError, match="agent.help_weight"):
        GAPGConfig(help_weight=-1.0)
    with pytest.raises(ConfigError, match="help_choices"):
        make_algorithm(GAPGConfig(help_weight=2.0), TrainConfig(), BudgetConfig(), 0, 8)
    paper = make_algorithm(
        GAPGConfig(kl_anchor=0.1, kl_anchor_scope="all"), TrainConfig(), BudgetConfig(), 0, 8
    )
    assert not paper.needs_decision and paper.decision_choices is None


def test_content_anchor_and_help_weight_in_the_trainer(tmp_path):
    overrides = [
        "agent=gapg",
        "agent.kl_anchor=0.1",
        "agent.kl_anchor_scope=content",
        "agent.help_weight=4.0",
    ]
    run = compose_experiment("smoke", [*overrides, "agent.filtering=false", "train.steps=2"])
    trainer = Trainer(run, tmp_path)
    judge_first_token(trainer)
    assert trainer.algorithm.needs_decision and trainer.reference is not None
    first, second = trainer.step(1, QuietLog()), trainer.step(2, QuietLog())
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6)
    assert second["loss/kl"] > 0 and math.isfinite(second["loss/policy"])

"""Where a device that writes a trace can call for help, and the budget-calibrated help bias."""

from __future__ import annotations

import math

from hydra import compose, initialize_config_dir
from test_train_smoke import CONFIGS

from agents.baselines import EvalContext, run_method
from agents.config import RolloutConfig
from agents.metrics import summarize
from agents.policy import Policy
from agents.registry import register_configs, to_objects
from agents.rollout.hf import HFRollout
from collab_env.models import load_model, load_tokenizer
from collab_env.tasks import HELP_MARKER

TRACE = {"name": "tiny-random", "dtype": "float32", "recipe": {"trace": True}}


def decoded(env, branches) -> list[tuple[list[str], str]]:
    tokenizer = env.unwrapped.tokenizer
    return sorted(([tokenizer.decode([t]) for t in b.prefix], tokenizer.decode([b.token])) for b in branches)


def test_a_device_that_writes_its_steps_branches_into_the_marker_after_any_step(make_env):
    """Without a trace the marker leaves `<answer>` / ` <answer>` after their shared `<` or ` <`; with
    one, ` <` starts nothing else (steps are separated by a space, the trace ends with `</think>`), so
    it is the help action wherever it comes, and only `<` is shared, with the trace's `<think>`."""
    task = {"name": "running_total", "num_train": 64, "num_test": 16}
    plain = make_env(device={"name": "tiny-random"}, task=task)
    trace = make_env(device=TRACE, task=task)
    assert decoded(plain, plain.unwrapped.help_branches()) == [([" <"], "unknown"), (["<"], "unknown")]
    assert decoded(trace, trace.unwrapped.help_branches()) == [([], " <"), (["<"], "unknown")]
    policy = Policy(load_model(TRACE), load_tokenizer("tiny-random"))
    engine = HFRollout(policy, trace, RolloutConfig(max_batch=16))
    prompts = [trace.unwrapped.prompt_tokens(p.id) for p in trace.unwrapped.task.problems("test")]
    help_token = trace.unwrapped.tokenizer.encode(" <", add_special_tokens=False)
    forced = engine.generate(prompts, 8, greedy=True, seed=0, help_bias=1e4).completions
    banned = engine.generate(prompts, 8, greedy=True, seed=0, help_bias=-math.inf).completions
    assert all(c[:1] == help_token for c in forced)
    assert not any(help_token[0] in c for c in banned)


def finishing_the_marker(generate):
    """HFRollout.generate of a device that, once it has written a help branch token, writes the rest
    of the marker (a trained device does; the random tiny model would write noise)."""

    def run(self, prompts, max_new_tokens, greedy, seed, help_bias=0.0, stop_rules=True):
        out = generate(self, prompts, max_new_tokens, greedy, seed, help_bias, stop_rules)
        marker = self.env.tokenizer.encode(" " + HELP_MARKER, add_special_tokens=False)
        for row, completion in enumerate(out.completions):
            if marker[0] in completion:
                at = completion.index(marker[0])
                out.completions[row] = completion[:at] + marker
                out.logprobs[row] = out.logprobs[row][:at] + [0.0] * len(marker)
        return out

    return run


def test_the_calibrated_bias_calls_on_the_budget_share_of_training_prompts(tmp_path, monkeypatch):
    """The bias is chosen so that greedy decoding calls on rho/(1+rho) of the training prompts (to one
    prompt), and the held-out prompts are decoded with it: the untrained tiny device, which greedy
    decoding never lets call, then calls, and the cap still holds."""
    monkeypatch.setattr(HFRollout, "generate", finishing_the_marker(HFRollout.generate))
    register_configs()
    overrides = [
        "experiment=smoke",
        "task.name=running_total",
        "+device.recipe.trace=true",
        "env.max_new_tokens=24",
        "evaluate.router_prompts=40",
    ]
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        run = to_objects(compose(config_name="evaluate", overrides=overrides))
    ctx = EvalContext(run, tmp_path)
    plain = run_method("device_with_help", ctx)
    calibrated = run_method("device_with_help_calibrated", ctx)
    extra = calibrated.extra
    assert abs(extra["calibration/train_call_rate"] - run.budget.share) <= 1 / 40 + 1e-9
    assert math.isfinite(extra["calibration/help_bias"]) and extra["calibration/help_bias"] > 0
    assert summarize(plain.infos)["help_rate"] < summarize(calibrated.infos)["help_rate"]
    assert summarize(calibrated.infos)["cloud_rate"] <= run.budget.share + 1e-9
    assert calibrated.label.endswith("budget-calibrated")

"""Where in its trace a device calls for help, and what comes before the call: the early-exit behaviour
of a device that writes its steps (`<think>37+48=85 85-29=56 <unknown> ...`) before it answers or calls.

For each held-out completion that called for help (its info's `called_help`, the text in `completion`,
which `agents.evaluation.evaluate_policy` keeps), the **call position** is the number of complete steps
`a op b = c` written inside `<think>` before the marker; steps are read with a pattern, so a step cut in
half by the marker does not count, and nor does anything that is not a step. What precedes the call is
measured against the task's own `worked_steps`:

- whether every written step is the true one (`all_right`),
- whether the last written step differs from the true step at its place (`last_wrong`; a call after no
  step has no last step),
- whether the next, unwritten, true step carries or borrows in the units column
  (`collab_env.tasks.running_total.step_carries` on the true running total; only for + and - steps, and
  only when a step is left).

Tasks without worked steps (`worked_steps` returns []) are skipped: there is nothing to place a call in.
Only methods whose infos carry the completion text (the policies, not the routers) are counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agents.baselines.context import MethodResult
from collab_env.tasks import TASKS, Task, make_task
from collab_env.tasks.running_total import step_carries

STEP = re.compile(r"(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)")
"""A complete step `a op b = c` (spaces allowed around the symbols)."""
CALL_STARTS = ("<unknown>", "I need external assistance")
"""Where a call for help begins in a completion: the marker, or its untagged wording."""
PRECEDES = ("none", "right", "wrong")
"""What the last written step before a call was: no step yet, the true step, another one."""
SHOWN_POSITIONS = 4
"""Positions 0..3 get a column of the report's table (later calls are in the histogram)."""


@dataclass(frozen=True)
class TracedCall:
    """One call for help placed in its trace."""

    position: int
    """Complete steps written before the marker."""
    all_right: bool
    """Every written step is the true one (True when none is written)."""
    last_wrong: bool
    """The last written step differs from the true step at its place (False when none is written)."""
    next_carries: bool | None
    """Whether the next unwritten true step carries or borrows; None when no step is left or the step is
    not an addition or subtraction."""

    @property
    def precedes(self) -> str:
        """One of PRECEDES: what the last written step was."""
        return "none" if self.position == 0 else "wrong" if self.last_wrong else "right"


def steps_before_call(completion: str) -> list[str] | None:
    """The complete steps written before the call for help, normalised to `a op b = c` without spaces;
    None when the completion does not call."""
    cuts = [i for i in (completion.find(start) for start in CALL_STARTS) if i >= 0]
    if not cuts:
        return None
    before = completion[: min(cuts)]
    think = before.rfind("<think>")
    trace = before[think + len("<think>") :] if think >= 0 else before
    return ["{}{}{}={}".format(*m.groups()) for m in STEP.finditer(trace)]


def carries(step: str) -> bool | None:
    """Whether a true step `a+b=c` / `a-b=c` carries or borrows in the units column (None: another op)."""
    match = STEP.fullmatch(step)
    if match is None or match.group(2) not in "+-":
        return None
    return step_carries(int(match.group(1)), match.group(2), int(match.group(3)))


def trace_call(written: list[str], truth: list[str]) -> TracedCall:
    """Place a call after `written` steps against the true steps `truth`."""
    right = [w == t for w, t in zip(written, truth, strict=False)] + [False] * max(
        0, len(written) - len(truth)
    )
    k = len(written)
    return TracedCall(
        position=k,
        all_right=all(right),
        last_wrong=bool(written) and not right[-1],
        next_carries=carries(truth[k]) if k < len(truth) else None,
    )


@dataclass
class CallPositions:
    """Counts of one method's calls by position and by what precedes them (summed over seeds)."""

    completions: int = 0
    """Held-out completions read (calls or not)."""
    calls: int = 0
    by_position: dict[int, Counter[str]] = field(default_factory=dict)
    """position -> Counter over PRECEDES."""
    all_right: int = 0
    last_wrong: int = 0
    next_carries: int = 0
    next_known: int = 0
    """Calls with a next step whose carrying is known (the denominator of `next_carries`)."""
    max_steps: int = 0
    """The most true steps of a read problem: the histogram's last position."""
    true_steps: int = 0
    carrying_steps: int = 0
    """All true + / - steps of the read problems, and those that carry: the base rate of a carry."""

    def add(self, call: TracedCall | None) -> None:
        if call is None:
            return
        self.calls += 1
        self.by_position.setdefault(call.position, Counter())[call.precedes] += 1
        self.all_right += call.all_right
        self.last_wrong += call.last_wrong
        if call.next_carries is not None:
            self.next_known += 1
            self.next_carries += call.next_carries

    def as_dict(self) -> dict[str, Any]:
        """Plain counts for results.json (`by_position`: position -> {what precedes: calls})."""
        out = {k: v for k, v in vars(self).items() if k != "by_position"}
        return {**out, "by_position": {k: dict(v) for k, v in sorted(self.by_position.items())}}

    def at(self, position: int) -> int:
        return sum(self.by_position.get(position, Counter()).values())


def count_calls(
    infos: list[dict[str, Any]], task: Task, into: CallPositions | None = None
) -> CallPositions | None:
    """The call positions of one method's held-out infos (added to `into`); None when the infos carry no
    completion text or the task has no worked steps."""
    if not infos or any("completion" not in info for info in infos):
        return None
    truths = [task.worked_steps(task.problem(info["prompt_id"])) for info in infos]
    if not all(truths):
        return None
    out = into or CallPositions()
    for info, truth in zip(infos, truths, strict=True):
        out.completions += 1
        out.max_steps = max(out.max_steps, len(truth))
        steps = [c for c in map(carries, truth) if c is not None]
        out.true_steps += len(steps)
        out.carrying_steps += sum(steps)
        written = steps_before_call(info["completion"]) if info["called_help"] else None
        out.add(None if written is None else trace_call(written, truth))
    return out


def has_worked_steps(task_name: str | None) -> bool:
    """Whether the task's class writes worked steps (overrides `Task.worked_steps`), without building it."""
    cls = TASKS.get(task_name or "")
    return cls is not None and cls.worked_steps is not Task.worked_steps


def task_from_context(context: dict[str, Any]) -> Task | None:
    """The report context's task rebuilt from its settings (`context["config"]["task"]`), only when its
    class writes worked steps; None otherwise."""
    settings = context.get("config", {}).get("task")
    if not settings or not has_worked_steps(settings.get("name")):
        return None
    return make_task(settings)


def call_positions(by_seed: dict[int, list[MethodResult]], task: Task) -> dict[str, CallPositions]:
    """Per method (in the order of the first seed), its calls summed over seeds; methods without
    completion text or without any call are left out."""
    out: dict[str, CallPositions] = {}
    for seed in sorted(by_seed):
        for r in by_seed[seed]:
            counted = count_calls(r.infos, task, out.get(r.name))
            if counted is not None:
                out[r.name] = counted
    return {name: c for name, c in out.items() if c.calls}


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}" if whole else "–"


def position_lines(positions: dict[str, CallPositions], labels: dict[str, str], image: str) -> list[str]:
    """The report's section: a table per method and a sentence on how to read it, then the histogram."""
    if not positions:
        return []
    shown = [f"{k} steps %" if k != 1 else "1 step %" for k in range(SHOWN_POSITIONS)]
    lines = [
        "",
        "Where in its trace each policy calls for help (held-out completions, all seeds): the share of its",
        "calls made after 0, 1, 2, 3 written steps, of those whose last written step was wrong (differs from",
        "the true step), and of those whose next, unwritten step would carry or borrow (base rate: the share",
        "of all true steps that carry). A device that knows when it is stuck calls right after a wrong step",
        "or before a carrying one; one that calls at position 0 decides before doing any work, as a router.",
        "",
        f"| method | calls | {' | '.join(shown)} | last step wrong % | next step carries % | base rate % |",
        "|---|---|" + "---|" * (SHOWN_POSITIONS + 3),
    ]
    for name, c in positions.items():
        cells = [_share(c.at(k), c.calls) for k in range(SHOWN_POSITIONS)]
        base = _share(c.carrying_steps, c.true_steps)
        lines.append(
            f"| {labels.get(name, name)} | {c.calls} | {' | '.join(cells)} | {_share(c.last_wrong, c.calls)} | "
            f"{_share(c.next_carries, c.next_known)} | {base} |"
        )
    return [*lines, "", f"![call_positions]({image})"]

"""``gradwatch explain`` for what gradwatch says about the training loop itself: notices
that are not findings of a rule (they concern where gradwatch is called, not the model).
Plain text only: ``explain`` must answer without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    slug: str
    summary: str
    explanation: str


TOPICS: tuple[Topic, ...] = (
    Topic(
        "step-placement",
        "watcher.step() found no gradient at all; what the close summary counts",
        """\
What it says: "watcher.step() found no gradient at all (every .grad is None)" or
"every gradient was exactly 0", once per run, and the close summary then says
"nothing was measured" instead of "no findings".

Why: gradwatch measures the gradients that exist when watcher.step() runs. Called
before loss.backward(), or after optimizer.zero_grad(), it finds none (zero_grad()
sets .grad to None, or to zeros with set_to_none=False), so every rule stays
silent and "no findings" would mean nothing. The summary therefore always says
how many steps were counted and measured, over how many layers, e.g. "no findings
in 12 measured steps of 180 (20 layers)".

How to fix it: call watcher.step() after loss.backward() and before
optimizer.step() and optimizer.zero_grad(); or pass the optimizer,
gradwatch.watch(model, optimizer=opt), and drop the call: gradwatch then measures
inside optimizer.step(), where the gradients are final, once per optimizer step
(gradient accumulation included). A watcher.step(loss=loss) kept in that loop
counts the step itself when it follows a backward pass, and otherwise hands its
loss to the optimizer step that follows: no step is counted twice.

When it stays silent: a single call without gradient (a stray call before the
first backward pass) is not counted and not reported.""",
    ),
    Topic(
        "optimizer-in-backward",
        "the optimizer steps inside backward(): no gradient is left to measure",
        """\
What it says: "the optimizer steps inside backward()", once per run, when
watcher.step() finds no gradient and most parameters carry post-accumulate-grad
hooks: the memory-saving recipe in which each parameter's hook calls
optimizer.step() for it and sets .grad = None as soon as its gradient is ready.

Why: no gradient outlives backward(), so gradwatch, which reads the gradients
after backward(), has nothing to measure; the close summary says so. Its forward
hooks are not left armed: the steps are counted and only every n-th is prepared.

How to get measurements: run some steps (a short diagnostic run) with the usual
loop, loss.backward(); optimizer.step(); optimizer.zero_grad(), with
gradwatch.watch(model, optimizer=opt), then switch back to stepping inside
backward.""",
    ),
)


def find_topic(name: str) -> Topic | None:
    """The topic named ``name`` (its slug), if any.

    >>> find_topic("step-placement").summary.startswith("watcher.step()")
    True
    """
    wanted = name.strip().lower()
    return next((t for t in TOPICS if t.slug == wanted), None)


__all__ = ["TOPICS", "Topic", "find_topic"]

"""Waiting for the ``gpu`` pool in an in-process run: asleep, and stoppable by a signal.

Dagster's in-process executor (``execute_in_process``, which ``mantle segment`` uses)
asks for the step's pool slot, and while the slot is taken it should sleep until the
next claim check (1 s, backing off to 15 s). Dagster 1.13 computes that sleep as
``min([0, *intervals])``, which is never positive, so a waiting run spins a core
re-checking in-memory state. Its interrupt handling, which defers SIGINT and SIGTERM
to the step's own code, never looks at them in that loop, so a waiting run ignored
both. :func:`sleep_while_waiting_for_slots` replaces the two methods involved with what
Dagster means them to do (check them again on a Dagster upgrade).

The multiprocess executor of daemon, UI and sensor runs has a loop of its own, which
never sleeps: while every step waits for a slot and none is running, it spins a core.
The code location's executor, :data:`mantle_executor` (Dagster's default executor,
patched in the run worker when it starts the run), makes that loop sleep until the
next claim check, at most a second at a time, so that the loop's own check for
SIGINT/SIGTERM still comes round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from dagster import Executor, InitExecutorContext, executor, multi_or_in_process_executor
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent
from dagster._core.execution.plan.active import ActiveExecution
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext


def _interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
    """Seconds until the earliest pending claim is checked again; 0 when one is due or none waits."""
    if not self._pending_claims or not self._pending_timeouts:
        return 0.0
    return max(0.0, min(self._pending_timeouts.values()) - time.time())


def _sleep_til_ready(self: ActiveExecution) -> None:
    """Sleep until a step may run, raising a SIGINT or SIGTERM received before or during the sleep."""
    with raise_execution_interrupts():
        seconds = self.sleep_interval()
        if seconds > 0:
            time.sleep(seconds)


# Longest sleep of the multiprocess loop: it looks at SIGINT/SIGTERM only between sleeps.
MAX_IDLE_SLEEP_SECONDS = 1.0

_dagster_concurrency_event_iterator = ActiveExecution.concurrency_event_iterator


def _concurrency_event_iterator(self: ActiveExecution, plan_context) -> Iterator[DagsterEvent]:
    """Dagster's "waiting for a slot" events, then, if no step runs and one waits for a slot, a nap.

    With a step running, the multiprocess loop already waits on that step's events; the
    in-process loop's :func:`_sleep_til_ready` sleeps only what is left until the same claim
    check, so the nap adds no delay there.
    """
    yield from _dagster_concurrency_event_iterator(self, plan_context)
    concurrency = self._instance_concurrency_context
    if concurrency is None or not concurrency.has_pending_claims() or self.has_in_flight_steps:
        return
    seconds = min(MAX_IDLE_SLEEP_SECONDS, concurrency.interval_to_next_pending_claim_check())
    if seconds > 0:
        time.sleep(seconds)


def sleep_while_waiting_for_slots() -> None:
    """Make runs of this process sleep while they wait for a pool slot; in-process runs stop on a signal."""
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = _interval_to_next_pending_claim_check
    ActiveExecution.sleep_til_ready = _sleep_til_ready
    ActiveExecution.concurrency_event_iterator = _concurrency_event_iterator


@executor(
    name="mantle_executor",
    config_schema=multi_or_in_process_executor.config_schema,
    requirements=multi_or_in_process_executor.get_requirements,
)
def mantle_executor(init_context: InitExecutorContext) -> Executor:
    """Dagster's default executor (multiprocess unless configured ``in_process``), asleep while waiting for a slot.

    The patch is applied here, in the run worker that executes the run, not when the code
    location is imported.
    """
    sleep_while_waiting_for_slots()
    return multi_or_in_process_executor.executor_creation_fn(init_context)

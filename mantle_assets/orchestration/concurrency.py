"""Waiting for the ``gpu`` pool in an in-process run: asleep, and stoppable by a signal.

Dagster's in-process executor (``execute_in_process``, which ``mantle segment`` uses)
asks for the step's pool slot, and while the slot is taken it should sleep until the
next claim check (1 s, backing off to 15 s). Dagster 1.13 computes that sleep as
``min([0, *intervals])``, which is never positive, so a waiting run spins a core
re-checking in-memory state. Its interrupt handling, which defers SIGINT and SIGTERM
to the step's own code, never looks at them in that loop, so a waiting run ignored
both. :func:`sleep_while_waiting_for_slots` replaces the two methods involved with what
Dagster means them to do (check them again on a Dagster upgrade). The multiprocess
executor of daemon and UI runs has a waiting loop of its own, not covered here.
"""

from __future__ import annotations

import time

from dagster._core.errors import raise_execution_interrupts
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


def sleep_while_waiting_for_slots() -> None:
    """Make in-process runs of this process sleep while they wait for a pool slot, and stop on a signal."""
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = _interval_to_next_pending_claim_check
    ActiveExecution.sleep_til_ready = _sleep_til_ready

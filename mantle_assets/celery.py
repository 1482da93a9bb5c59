"""The code location for GPU workers on other machines: every step is a Celery task, GPU steps on queue ``gpu``.

The same assets, jobs, sensors and schedules as :mod:`mantle_assets.definitions`, run by
dagster-celery's execution loop: the run's process sends each step to the broker, and a Celery
worker listening to the step's queue runs it. GPU steps (segmentation, cell masks, training)
carry the ``dagster-celery/queue: gpu`` tag (``GPU_OP_TAGS``) and go to the workers started
with ``-Q gpu`` on the GPU machines; the others go to the default queue, ``dagster``. The run's
process claims the step's ``gpu`` pool slot before it sends the step, so the pool still limits
how many GPU steps run at once over all runs.

Every machine names the broker in ``$CELERY_BROKER_URL`` (results go to
``$CELERY_RESULT_BACKEND``, by default the same Redis). Workers start with
``celery -A mantle_assets.celery worker -Q gpu`` (or ``-Q dagster``); README's deployment
guide has the commands.

dagster-celery waits for a step's result without end, so a worker killed while it runs a step
(its processes killed, its machine down) would leave the run waiting and its gpu slot taken for
ever. :class:`WatchedStep` asks the worker that started the step whether it is alive (a Celery
ping, which the worker's main process answers while its pool process computes) and fails the
step when it has not answered for ``worker_lost_after_seconds``; a step whose pool process died
under a living worker (Celery's ``WorkerLostError``) fails at once. The failure frees the slot.
"""

from __future__ import annotations

import os
import time
from functools import cache

from celery import Celery, states
from celery.exceptions import WorkerLostError
from dagster import Executor, Field, InitExecutorContext, executor, multiple_process_executor_requirements
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._record import replace
from dagster._serdes import serialize_value
from dagster_celery.core_execution_loop import core_celery_execution_loop
from dagster_celery.executor import CeleryExecutor, _submit_task
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task
from dagster_shared.error import SerializableErrorInfo

from mantle_assets import definitions

BROKER_ENV = "CELERY_BROKER_URL"
BACKEND_ENV = "CELERY_RESULT_BACKEND"

# Settings of the executor's and the workers' Celery app, beyond dagster-celery's.
CELERY_SETTINGS = {
    # A started step's state names its worker (hostname, pid): whom WatchedStep asks whether it is alive.
    "task_track_started": True,
    # A worker takes a step only when a pool process is free to run it (Redis brokers), so a lost
    # worker takes no step waiting in the queue with it.
    "worker_disable_prefetch": True,
    # Celery's default, said because it matters: a step's task is acknowledged when it starts, so a step
    # failed for a lost worker is never given to another worker to run a second time.
    "task_acks_late": False,
}

DEFAULT_WORKER_LOST_AFTER_SECONDS = 60.0
# How often a started step's worker is pinged, and how long a ping waits for the answer.
WORKER_CHECK_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 1.0


def broker_urls() -> tuple[str, str]:
    """The broker's URL (``$CELERY_BROKER_URL``) and the result backend's (``$CELERY_RESULT_BACKEND``, else the broker).

    Raises
    ------
    ValueError
        One line naming ``CELERY_BROKER_URL`` when it is not set.
    """
    broker = os.environ.get(BROKER_ENV, "").strip()
    if not broker:
        raise ValueError(
            f"{BROKER_ENV} is not set: the Celery executor and workers need the broker's URL, "
            "e.g. redis://server:6379/0, the same on every machine"
        )
    return broker, os.environ.get(BACKEND_ENV, "").strip() or broker


class WatchedStep:
    """A step's Celery task, polled by the Celery loop (``ready``, ``get``, ``revoke``); failed if its worker is lost.

    Parameters
    ----------
    app
        The Celery app the task was sent with.
    result
        The task's ``AsyncResult``.
    step_context
        The run's context for the step, which the failure event is logged with.
    known_state
        The run's execution state when the step was sent: its retries so far.
    lost_after
        Seconds a started step's worker may leave pings unanswered before the step is failed.
    """

    def __init__(self, app: Celery, result, step_context, known_state, lost_after: float):
        self._app = app
        self._result = result
        self._step_context = step_context
        self._known_state = known_state
        self._lost_after = lost_after
        self._next_check = time.monotonic() + WORKER_CHECK_SECONDS
        self._silent_since: float | None = None
        self._lost: str | None = None

    def ready(self) -> bool:
        if self._lost is not None or self._result.ready():
            return True
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + WORKER_CHECK_SECONDS
            self._check_worker(now)
        return self._lost is not None

    def _check_worker(self, now: float) -> None:
        # A step not started yet waits in its queue for any worker of it; none of them holds it.
        if self._result.state != states.STARTED:
            self._silent_since = None
            return
        started = self._result.info or {}
        worker = started.get("hostname")
        if self._app.control.ping(destination=[worker], timeout=PING_TIMEOUT_SECONDS, limit=1):
            self._silent_since = None
            return
        if self._silent_since is None:
            self._silent_since = now
        elif now - self._silent_since >= self._lost_after:
            self._lost = (
                f"Celery worker {worker} stopped answering while it ran step {self._step_context.step.key} "
                f"(pid {started.get('pid')}): no reply to pings for {now - self._silent_since:.0f} s, so it was "
                "killed or its machine is down; the step is failed and its pool slot freed"
            )

    def get(self) -> list[str]:
        """The step's serialized events: the worker's, or, for a lost worker, the failure logged here."""
        if self._lost is None:
            try:
                return self._result.get()
            except WorkerLostError as error:
                self._lost = (
                    f"The pool process running step {self._step_context.step.key} in a Celery worker died: {error}"
                )
        error = SerializableErrorInfo(self._lost, stack=[], cls_name=None)
        failure = self._step_context.executor.log_failure_or_retry_event_after_error(
            self._step_context, error, self._known_state
        )
        return [serialize_value(failure)]

    def revoke(self) -> None:
        self._result.revoke()


class MantleCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor on the broker of ``$CELERY_BROKER_URL``, failing steps whose worker is lost."""

    def __init__(self, retries: RetryMode, worker_lost_after_seconds: float = DEFAULT_WORKER_LOST_AFTER_SECONDS):
        broker, backend = broker_urls()
        super().__init__(retries=retries, broker=broker, backend=backend, config_source=CELERY_SETTINGS)
        self.worker_lost_after_seconds = worker_lost_after_seconds

    def execute(self, plan_context, execution_plan):
        return core_celery_execution_loop(plan_context, execution_plan, step_execution_fn=self._send_step)

    def _send_step(self, app, plan_context, step, queue, priority, known_state) -> WatchedStep:
        result = _submit_task(app, plan_context, step, queue, priority, known_state)
        return WatchedStep(app, result, plan_context.for_step(step), known_state, self.worker_lost_after_seconds)


@executor(
    name="mantle_celery",
    config_schema={
        "retries": get_retries_config(),
        "worker_lost_after_seconds": Field(
            float,
            default_value=DEFAULT_WORKER_LOST_AFTER_SECONDS,
            is_required=False,
            description="Seconds the worker running a step may leave pings unanswered before the step is failed.",
        ),
    },
    requirements=multiple_process_executor_requirements(),
)
def mantle_celery_executor(init_context: InitExecutorContext) -> Executor:
    """Steps as Celery tasks on ``$CELERY_BROKER_URL``: GPU steps on queue ``gpu``, the others on ``dagster``."""
    config = init_context.executor_config
    return MantleCeleryExecutor(RetryMode.from_config(config["retries"]), config["worker_lost_after_seconds"])


@cache
def worker_app() -> Celery:
    """The workers' Celery app: the executor's broker and settings, and dagster-celery's step task."""
    app = make_app(MantleCeleryExecutor(RetryMode(RetryMode.DISABLED)).app_args())
    create_task(app)
    return app


def __getattr__(name: str):
    # `celery -A mantle_assets.celery worker` takes this module's `app`: made when asked for, not on import.
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Definitions.merge refuses two executors: the local location's is replaced. Its module is imported, not its
# `defs`, so that `dagster-webserver -m mantle_assets.celery` finds one Definitions object here.
defs = replace(definitions.defs, executor=mantle_celery_executor)

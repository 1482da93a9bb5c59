"""Retrying steps that failed for a transient reason, and failing for good those asked for what cannot work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dagster import Failure, RetryRequested

from mantle_assets.entities import EntityNotFoundError, StoreBusyError

STORE_BUSY_RETRIES = 3
# What the platform raises when it refuses a request; the first line of the message says why.
REFUSALS = (ValueError, EntityNotFoundError)


@contextlib.contextmanager
def retried_while_store_busy(seconds_to_wait: float) -> Iterator[None]:
    """Turn a busy entity store into a Dagster retry of the step.

    Another process holding the DuckDB file for longer than the lock timeout
    (a long migration, someone's DuckDB CLI) is transient: the step is run
    again after ``seconds_to_wait``, up to ``STORE_BUSY_RETRIES`` times.
    Anything else fails the step at once, with its own message.
    """
    try:
        yield
    except StoreBusyError as error:
        raise RetryRequested(max_retries=STORE_BUSY_RETRIES, seconds_to_wait=seconds_to_wait) from error


@contextlib.contextmanager
def refusals_as_failures() -> Iterator[None]:
    """Turn a refused request into a Dagster ``Failure`` whose description is the refusal's one line.

    The platform refuses what a person asked for and cannot work (an unknown model, a channel the
    images lack, an entity that is not there) with a ``ValueError`` or ``EntityNotFoundError`` whose
    first line names it. As a ``Failure`` that line is the description the run page shows first,
    with no stack trace of the refusal's, and no retry policy repeats it: it would be refused again.
    """
    try:
        yield
    except REFUSALS as error:
        raise Failure(description=str(error).splitlines()[0], allow_retries=False) from None

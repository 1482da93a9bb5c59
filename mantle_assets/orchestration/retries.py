"""Retrying steps that failed for a transient reason."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dagster import RetryRequested

from mantle_assets.entities import StoreBusyError

STORE_BUSY_RETRIES = 3


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

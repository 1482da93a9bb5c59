"""Rows of the measurement and readout tables, written in the transaction that records their entity.

The tables are part of the schema (version 2 of :mod:`mantle_assets.entities.schema`);
:meth:`mantle_assets.entities.store.EntityStore.record_output` calls these
inside its transaction, so a run that fails records neither the entity nor its rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import duckdb

from mantle_assets.entities.database import utc_now
from mantle_assets.entities.schema import READOUT_WELL_COLUMNS

__all__ = ["record_readout", "replace_measurements"]

_MEASUREMENT_KEYS = ("field", "label", "well")


def _quoted(identifier: str) -> str:
    return '"' + str(identifier).replace('"', '""') + '"'


def replace_measurements(connection: duckdb.DuckDBPyConnection, entity_id: str, table: Any) -> None:
    """Replace the ``cell_measurements`` rows of ``entity_id`` with ``table``, one row per object and measurement.

    Parameters
    ----------
    connection : duckdb.DuckDBPyConnection
        In the caller's open transaction.
    entity_id : str
        The measured output.
    table : pandas.DataFrame
        Columns ``field``, ``label``, ``well`` and numeric measurements.

    Raises
    ------
    ValueError
        If a key column is missing or a measurement is not numeric.
    """
    missing = [key for key in _MEASUREMENT_KEYS if key not in table.columns]
    if missing:
        raise ValueError(f"measurements of {entity_id} lack column(s) {', '.join(missing)}")
    connection.execute("DELETE FROM cell_measurements WHERE entity_id = ?", [entity_id])
    values = [column for column in table.columns if column not in _MEASUREMENT_KEYS]
    not_numeric = [column for column in values if table[column].dtype.kind not in "biuf"]
    if not_numeric:
        raise ValueError(f"measurements of {entity_id} must be numeric, not column(s) {', '.join(not_numeric)}")
    if table.empty or not values:
        return
    # Registered on this short-lived connection only; it goes when the connection closes.
    connection.register("new_measurements", table)
    connection.execute(
        "INSERT INTO cell_measurements SELECT ?, field, label, well, measurement, value FROM new_measurements "
        f"UNPIVOT INCLUDE NULLS (value FOR measurement IN ({', '.join(_quoted(column) for column in values)}))",
        [entity_id],
    )


def record_readout(connection: duckdb.DuckDBPyConnection, entity_id: str, run_id: str, readout: Mapping) -> None:
    """Write a run's plate readout as rows of ``assay_readouts`` and ``readout_wells``.

    EC50 and Z' are columns of a table written with the run rather than a
    view over the entity's properties: the properties hold only the
    latest run's values, while rows keyed by (entity, run) keep every
    run's, so a plate's Z' across reruns and the wells behind each value
    are plain queries. A retried run replaces its own rows. The views
    ``current_assay_readouts`` and ``current_readout_wells`` keep, per
    image directory, the latest run of its unarchived readouts.

    Parameters
    ----------
    connection : duckdb.DuckDBPyConnection
        In the caller's open transaction.
    entity_id, run_id : str
        The readout entity and the run that made it.
    readout : Mapping
        ``image_directory`` (the plate's entity id) and what
        :meth:`~mantle_assets.imaging.assay.PlateReadout.to_json` gives.
    """
    for table in ("assay_readouts", "readout_wells"):
        connection.execute(f"DELETE FROM {table} WHERE entity_id = ? AND run_id = ?", [entity_id, run_id])
    fit = readout.get("fit") or {}
    low, high = fit.get("ec50_ci95") or (None, None)
    connection.execute(
        "INSERT INTO assay_readouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [entity_id, run_id, readout["image_directory"], readout["readout"], readout["n_cells"],
         readout.get("z_prime"), fit.get("ec50"), low, high, fit.get("hill"), fit.get("bottom"), fit.get("top"),
         fit.get("r_squared"), utc_now()],
    )
    wells = readout["wells"]
    if not wells:
        return
    # One statement for all wells: unnested parallel lists, in the table's column order.
    columns = [[well.get(column) for well in wells] for column in READOUT_WELL_COLUMNS]
    connection.execute(
        f"INSERT INTO readout_wells SELECT ?, ?, ?, {', '.join('unnest(?)' for _ in columns)}",
        [entity_id, run_id, readout["image_directory"], *columns],
    )

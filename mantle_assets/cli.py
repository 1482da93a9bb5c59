"""The ``mantle`` command: a thin layer over the library and the Dagster definitions."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import click

from mantle_assets.imaging.precision import PRECISIONS
from mantle_assets.settings import dagster_home, mantle_home


class MantleCommandError(click.ClickException):
    """A one-line error printed as ``Error: ...`` with exit status 1."""


def _prepare_environment() -> None:
    """Point this process and its children at the same Mantle and Dagster state."""
    os.environ["MANTLE_HOME"] = str(mantle_home())
    os.environ["DAGSTER_HOME"] = str(dagster_home())


class MantleGroup(click.Group):
    """Turns the platform's expected errors into one-line messages instead of tracebacks."""

    def invoke(self, ctx):
        from mantle_assets.entities import EntityNotFoundError, StoreBusyError, StoreUnusableError
        from mantle_assets.entities.types import UnknownDataTypeError

        try:
            return super().invoke(ctx)
        except (EntityNotFoundError, StoreBusyError, StoreUnusableError, UnknownDataTypeError) as error:
            raise MantleCommandError(str(error).splitlines()[0]) from None


def _store():
    from mantle_assets.entities import EntityStore

    return EntityStore()


def _instance(*, quiet: bool = False):
    """The Dagster instance of ``$DAGSTER_HOME``.

    ``quiet``: this process records no Dagster telemetry (whatever dagster.yaml says), so Dagster has
    nothing to announce and prints no telemetry notice; the daemon and `mantle ui` follow dagster.yaml.
    """
    import filelock
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    from mantle_assets.orchestration.instance import write_instance_settings

    write_instance_settings(dagster_home())
    # Opening a new SQLite instance creates and migrates its databases; CLI processes started
    # together (parallel `mantle segment`) would race on that, so they take turns.
    with filelock.FileLock(str(dagster_home() / ".instance.lock")):
        overrides = {"telemetry": {"enabled": False}} if quiet else None
        return DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home()), overrides=overrides))


VERBOSE = "mantle.verbose"


def _quiet() -> bool:
    """Whether the command runs without --verbose: progress and results only."""
    return not click.get_current_context().meta.get(VERBOSE, False)


def _step_messages_logger():
    """A Dagster logger printing what the steps say (per-field progress, warnings), without Dagster's own events.

    Errors are left to the command, which prints the run's first one as one line.
    """
    import logging

    from dagster import LoggerDefinition

    class StepMessage(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            message = record.dagster_meta["orig_message"]
            return f"warning: {message}" if record.levelno >= logging.WARNING else message

    def step_messages(_init_context) -> logging.Logger:
        handler = logging.StreamHandler()  # stderr, as Dagster's console logger
        handler.addFilter(lambda record: record.dagster_meta["dagster_event"] is None
                          and record.levelno < logging.ERROR)
        handler.setFormatter(StepMessage())
        step_logger = logging.Logger("mantle.steps", logging.INFO)
        step_logger.addHandler(handler)
        return step_logger

    return LoggerDefinition(step_messages, description="What the steps log, one plain line each.")


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(cls=MantleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Show Dagster's event log (DEBUG and up) of the runs this command makes, Dagster's telemetry "
              "(and its first-use notice) and library warnings; by default runs print progress and results only.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Mantle: register microscopy image directories, segment them with Cellpose, browse lineage.

    State lives in $MANTLE_HOME (default ./.mantle); Dagster runs in $DAGSTER_HOME
    (default $MANTLE_HOME/dagster), shared by the CLI and `mantle ui`.
    """
    ctx.meta[VERBOSE] = verbose
    if not verbose:
        # Libraries' warnings (torch's sparse checks in Cellpose, ...) are not the user's to act on.
        warnings.simplefilter("ignore")
    _prepare_environment()
    # SIGTERM stops a command as Ctrl-C does (KeyboardInterrupt), so that its clean-up code runs; within a
    # Dagster run, Dagster treats both alike. A handler of a program calling this one is left alone.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Dagster flags beta and preview APIs on import; users of the CLI cannot act on that.
    warnings.filterwarnings("ignore", message=".*currently in (beta|preview)")


@main.command()
# A plain string: click.Path would turn s3://lab/plate1 into s3:/lab/plate1.
@click.argument("directory")
@click.option("--experiment", "experiment_name", help="Experiment name recorded with the entity.")
@click.option("--name", help="Entity name (default: the directory's name).")
@click.option("--channel-names", help="Names of the channels in order, comma-separated (e.g. NFkB,DNA); "
              "they name the measurement columns.")
@click.option("--plate-layout", type=click.Path(path_type=Path),
              help="CSV of the plate: well,dose,control[,treatment] (control -1/0/1) or BBBC014's layout.")
@click.option("--pattern", "naming_pattern", metavar="REGEX",
              help="For file names no instrument scheme reads: a regular expression with named groups well (or row "
              "and column), field, channel, plane, timepoint, e.g. '(?P<well>[A-H]\\d+)-(?P<channel>GFP|DAPI)'.")
@click.option("--again", is_flag=True, help="Register a new entity even if DIRECTORY is already registered.")
@click.option("--json", "as_json", is_flag=True, help="Print the entity as JSON, with what was found under summary.")
def register(
    directory: str, experiment_name: str | None, name: str | None, channel_names: str | None,
    plate_layout: Path | None, naming_pattern: str | None, again: bool, as_json: bool,
) -> None:
    """Register DIRECTORY of images as an image_directory entity and Dagster partition.

    DIRECTORY is a folder or a URI such as s3://lab/plate1 (see "Object storage"
    in the README); its sub-folders are part of it. Prints the entity id and what was
    found, e.g. "E000012: 2 fields x 2 channels (ch1, ch2), wells A01, A12, scheme
    operetta", so that a wrong grouping shows before anything runs. A DIRECTORY that an
    unarchived entity already records (the same folder, symbolic links followed, or the
    same URI) prints that entity with a note; asking then for other values than it
    records is an error.
    """
    from mantle_assets.registration import existing_registration

    names = None if channel_names is None else [n.strip() for n in channel_names.split(",")]
    metadata = {"channel_names": names, "plate_layout": plate_layout, "naming_pattern": naming_pattern}
    try:
        existing = None if again else existing_registration(
            _store(), directory, experiment_name=experiment_name, name=name, **metadata
        )
    except ValueError as error:
        raise MantleCommandError(str(error)) from None
    if existing is not None:
        recorded = existing.properties["image_directory"]
        where = "" if recorded == directory else f" (as {recorded})"
        click.echo(f"note: {directory} is already registered as {existing.entity_id}{where}; "
                   "pass --again to register it anew", err=True)
    entity = existing or _register(directory, experiment_name, name, again=True, **metadata)
    summary = (entity.properties.get("field_grouping") or {}).get("summary")
    if as_json:
        _echo_json(entity.to_json() | {"summary": summary, "already_registered": existing is not None})
    else:
        click.echo(f"{entity.entity_id}: {summary}" if summary else entity.entity_id)


def _register(directory: str | Path, experiment_name: str | None, name: str | None, defaults: dict | None = None,
              **metadata):
    """Register and add the partition.

    ``metadata``: ``channel_names``, ``plate_layout``, ``naming_pattern``, ``again``.
    """
    from mantle_assets.imaging.fields import ImageDirectoryError
    from mantle_assets.orchestration.partitions import ensure_partition
    from mantle_assets.registration import register_image_directory

    try:
        entity = register_image_directory(
            _store(), directory, experiment_name, name=name, segmentation_defaults=defaults, **metadata
        )
    except (ImageDirectoryError, ValueError) as error:
        raise MantleCommandError(str(error)) from None
    ensure_partition(_instance(), entity)
    return entity


@main.command()
@click.option("--type", "data_type", help="Only entities of this data type.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--archived", is_flag=True, help="Include archived entities.")
def entities(data_type: str | None, as_json: bool, archived: bool) -> None:
    """List entities."""
    if as_json:
        # One entity per line, encoded by the store: a listing of every plate a facility keeps stays quick.
        listed = _store().list_json(data_type, include_archived=archived)
        click.echo("[\n" + ",\n".join(f"  {entity}" for entity in listed) + "\n]" if listed else "[]")
        return
    found = _store().list(data_type, include_archived=archived)
    for entity in found:
        click.echo(f"{entity.entity_id}  {entity.data_type:<28} v{entity.version}  {entity.name}")


@main.command()
@click.argument("entity_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(entity_id: str, as_json: bool) -> None:
    """Show an entity: properties, lineage and property history."""
    store = _store()
    with store.session():
        entity = store.get(entity_id)
        described = entity.to_json() | {
            "parents": [e.__dict__ for e in store.parents(entity_id)],
            "children": [e.__dict__ for e in store.children(entity_id)],
            "history": [c.__dict__ for c in store.history(entity_id)],
        }
    if as_json:
        _echo_json(described)
        return
    click.echo(f"{entity.entity_id}  {entity.data_type}  {entity.name}  (version {entity.version})")
    for key, value in entity.properties.items():
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        click.echo(f"  {key}: {text if len(text) < 100 else text[:97] + '...'}")
    for edge in described["parents"]:
        click.echo(f"  parent {edge['parent_id']} via {edge['pipeline']} (run {edge['run_id']})")
    for edge in described["children"]:
        click.echo(f"  child  {edge['child_id']} via {edge['pipeline']} (run {edge['run_id']})")
    click.echo(f"  {len(described['history'])} property changes recorded")


@main.command()
@click.argument("query", required=False)
@click.option("--snapshot", "snapshot_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead, copy the store as of now to this file, to open with any DuckDB client "
              "(duckdb.connect(FILE, read_only=True)) for as long as you like, and print its path.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON objects.")
def sql(query: str | None, snapshot_file: Path | None, as_json: bool) -> None:
    """Run read-only SQL QUERY over entities, lineage, measurements and readouts, beside running pipelines.

    Reads a copy of the store made as the command starts, so it neither waits for runs nor blocks them.
    """
    import duckdb

    if (query is None) == (snapshot_file is None):
        raise MantleCommandError("give a QUERY or --snapshot FILE (one of them)")
    store = _store()
    if snapshot_file is not None:
        try:
            click.echo(str(store.snapshot(snapshot_file)))
        except ValueError as error:
            raise MantleCommandError(str(error)) from None
        return
    with store.reader() as connection:
        try:
            cursor = connection.execute(query)
            columns = [column[0] for column in cursor.description or ()]
            rows = cursor.fetchall() if columns else []
        except duckdb.Error as error:
            raise MantleCommandError(" ".join(str(error).split())) from None
    if as_json:
        _echo_json([dict(zip(columns, row, strict=True)) for row in rows])
        return
    cells = [columns] + [["NULL" if value is None else str(value) for value in row] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    for line in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _segmentation_options(function):
    options = [
        click.option("--cellpose-model", default=None, help="Bundled or built-in model name, or a model file."),
        # Text, not int: a channel may be given by name, resolved against each entity's channels.
        click.option("--nuclei-channel", default=None,
                     help="Nuclear channel: 0 = none, c = the c-th channel of a field (1/2/3 = R/G/B in RGB files), "
                     "or a channel name (DNA, w1, ...)."),
        click.option("--cytoplasm-channel", default=None,
                     help="Channel to segment: 0 = grayscale, c = the c-th channel, or a channel name; "
                     "equal to --nuclei-channel for nuclei only."),
        click.option("--diameter", default=None, help="Object diameter in pixels, or None to estimate."),
        click.option("--flow-threshold", type=float, default=None),
        click.option("--cellprob-threshold", type=float, default=None),
        click.option("--min-size", type=int, default=None),
        click.option("--batch-size", type=int, default=None),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _execute(job_name: str, asset_name: str, config: dict, instance, partition_key: str | None = None):
    """Run an asset job in this process, recorded in the shared Dagster instance.

    Runs of killed CLI processes are failed first, so that their pool slots and partial outputs are freed, and so
    are those of ended runs of any origin.
    SIGINT or SIGTERM, while the run waits for a pool slot or while a step runs, stops the step (its partial
    outputs removed, its slot freed) and fails the run.
    Without --verbose the run prints what its steps log (per-field progress, warnings), not Dagster's events.
    """
    from dagster import DagsterEventType
    from dagster._core.events import RunFailureReason

    from mantle_assets.definitions import defs
    from mantle_assets.orchestration.concurrency import sleep_while_waiting_for_slots
    from mantle_assets.orchestration.recovery import (
        add_missing_partitions,
        fail_abandoned_runs,
        process_run_tags,
        release_ended_runs,
    )

    abandoned = fail_abandoned_runs(instance)
    for run_id in abandoned:
        click.echo(f"run {run_id} was abandoned by a killed process: marked failed", err=True)
    for run_id in release_ended_runs(instance):  # after failing the abandoned runs, whose slots it frees too
        if run_id not in abandoned:
            click.echo(f"run {run_id} had ended but held a pool slot: freed", err=True)
    add_missing_partitions(instance)  # of entities whose register was killed before adding them
    sleep_while_waiting_for_slots()
    job = defs.resolve_job_def(job_name)
    run_config = {"ops": {asset_name: {"config": config}}}
    if _quiet():
        # Named in the run config, or Dagster falls back to its console logger.
        job = job.with_logger_defs({"mantle_steps": _step_messages_logger()})
        run_config["loggers"] = {"mantle_steps": {}}
    result = job.execute_in_process(
        run_config=run_config,
        instance=instance,
        partition_key=partition_key,
        tags=process_run_tags(),
        raise_on_error=False,
    )
    run_failure = next((e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE), None)
    if run_failure and run_failure.job_failure_data.failure_reason == RunFailureReason.UNEXPECTED_TERMINATION:
        raise MantleCommandError(
            f"{job_name} run {result.run_id} interrupted (SIGINT or SIGTERM): stopped and marked failed"
        )
    if not result.success:
        # The first failed step of the run, which may be a later asset than ``asset_name``.
        failure = next((event.step_failure_data for event in result.get_step_failure_events()), None)
        raise MantleCommandError(f"{job_name} run {result.run_id} failed: {root_cause(failure)}")
    return result


def root_cause(failure) -> str:
    """The first line of the innermost error under Dagster's step-failure wrappers."""
    error = failure.error if failure else None
    if error is None:
        return "run failed"
    while error.cause is not None:
        error = error.cause
    line = error.message.strip().splitlines()[0]
    # Dagster writes "package.module.ErrorClass: message". The platform refuses with ValueErrors and errors of
    # its own whose messages say what is wrong; "KeyError: 'x'" or "ConnectionError: ..." need their class.
    qualified, _, message = line.partition(": ")
    refusal = qualified == "ValueError" or error.cls_name == "Failure" or (
        qualified.startswith("mantle_assets.") and qualified.endswith(f".{error.cls_name}")
    )
    return message if message and refusal else line


def _segment(entity_id: str, parameters: dict):
    """Materialise one partition of segmentation_masks through Dagster; return the output entity."""
    from mantle_assets.entities import EntityNotFoundError
    from mantle_assets.orchestration.assets import image_directory_entity, prepare_segmentation
    from mantle_assets.orchestration.config import SegmentationConfig, channel_numbers, coerce_segmentation_parameters
    from mantle_assets.orchestration.partitions import ensure_partition

    # Everything checkable is checked before a run exists, so a bad request records nothing.
    try:
        store = _store()
        given = coerce_segmentation_parameters({k: v for k, v in parameters.items() if v is not None})
        source = image_directory_entity(store, entity_id)
        config = SegmentationConfig(**channel_numbers(source, given))
        prepare_segmentation(store, entity_id, config)
    except (EntityNotFoundError, ValueError) as error:
        raise MantleCommandError(str(error).splitlines()[0]) from None
    instance = _instance(quiet=_quiet())
    key = ensure_partition(instance, source)
    result = _execute("segmentation_job", "segmentation_masks", config.model_dump(), instance, key)
    materialization = result.asset_materializations_for_node("segmentation_masks")[0]
    return _store().get(materialization.metadata["output_entity"].value), result.run_id


@main.command()
@click.argument("entity_id")
@_segmentation_options
def segment(entity_id: str, **parameters) -> None:
    """Segment image_directory ENTITY_ID with Cellpose (a Dagster run visible in `mantle ui`)."""
    output, run_id = _segment(entity_id, parameters)
    props = output.properties
    click.echo(
        f"{output.entity_id}: {props['total_cells']} objects in {props['fields']} fields "
        f"-> {props['mask_directory']} (run {run_id})"
    )


@main.command()
@click.argument("entity_id", required=False)
@click.option("--experiment", "experiment_name", help="Set the defaults of every image directory of this experiment.")
@_segmentation_options
@click.option("--cell-method", default=None,
              help="Whole cells the automation grows around new nuclei masks, then measures with: propagate, "
              "cellpose or none.")
def defaults(entity_id: str | None, experiment_name: str | None, **parameters) -> None:
    """Set default segmentation parameters of ENTITY_ID or of an experiment; print them.

    Automatic runs (the new-image-directory sensor, the nightly backfill) use them.
    """
    from mantle_assets.orchestration.registration_jobs import update_segmentation_defaults

    if (entity_id is None) == (experiment_name is None):
        raise MantleCommandError("give either ENTITY_ID or --experiment NAME")
    try:
        updated = update_segmentation_defaults(
            _store(), parameters, entity_id=entity_id, experiment_name=experiment_name
        )
    except ValueError as error:
        raise MantleCommandError(str(error).splitlines()[0]) from None
    for entity, resolved in updated:
        click.echo(f"{entity.entity_id}: {json.dumps(resolved.model_dump())}")


@main.command()
@click.argument("entity_id")
def archive(entity_id: str) -> None:
    """Archive ENTITY_ID: it leaves listings, and an image directory loses its Dagster partition."""
    entity = _store().archive(entity_id)
    click.echo(f"{entity.entity_id} archived")


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of {name, kind, path, offline, diam_mean, one_nuclear_channel}.")
def models(as_json: bool) -> None:
    """List the Cellpose models: bundled, cached built-ins and downloadable built-ins."""
    from mantle_assets.models.registry import available_models

    specs = available_models()
    if as_json:
        _echo_json([spec.to_json() for spec in specs])
        return
    for spec in specs:
        where = "offline" if spec.offline else "download on first use"
        click.echo(f"{spec.name:<30} {spec.kind:<8} {where:<22} {spec.path}")


@main.command()
@click.option("--all", "all_wells", is_flag=True, help="Segment all 96 wells (default: a quick subset).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="BBBC014 folder (images/ and plate_layout.csv); default: $MANTLE_DEMO_DATA, "
              "../shared/data/bbbc014, else the public archive is downloaded.")
@click.option("--cellpose-model", default=None, help="Model to segment with (default: the bundled nuclei model).")
@click.option("--json", "as_json", is_flag=True, help="Print the plate readout as JSON (progress goes to stderr).")
def demo(all_wells: bool, data: Path | None, cellpose_model: str | None, as_json: bool) -> None:
    """Register the BBBC014 demo plate, segment its nuclei (DNA = Channel2), measure NF-kB and read out the plate."""
    from mantle_assets import demo as demo_plate
    from mantle_assets.registration import registered_directories

    def say(text: str) -> None:
        click.echo(text, err=as_json)

    cache = mantle_home() / "demo"
    try:
        plate = demo_plate.locate_plate(data, cache)
        images = demo_plate.prepare_plate(plate, all_wells=all_wells, cache=cache)
    except demo_plate.DemoDataError as error:
        raise MantleCommandError(str(error)) from None
    parameters = demo_plate.segmentation_parameters(cellpose_model)
    metadata = demo_plate.registration_metadata(plate)
    entity = registered_directories(_store(), [images]).get(images)
    if entity is None:
        entity = _register(
            images, demo_plate.EXPERIMENT, None, {k: v for k, v in parameters.items() if v is not None}, **metadata
        )
    else:  # registered by an earlier demo, perhaps before it carried the layout and channel names
        entity = _store().update(entity.entity_id, metadata)
    say(f"image_directory {entity.entity_id}: {images}")
    output, run_id = _segment(entity.entity_id, parameters)
    say(
        f"segmentation_mask_directory {output.entity_id}: {output.properties['total_cells']} nuclei "
        f"in {output.properties['fields']} fields (run {run_id})"
    )
    measured, readout, run_id = _measure(entity.entity_id)
    say(
        f"cell_measurement_table {measured.entity_id}: {measured.properties['total_objects']} objects, "
        f"channels {', '.join(measured.properties['channel_names'])} (run {run_id})"
    )
    if as_json:
        _echo_json({
            "image_directory": entity.entity_id,
            "segmentation_mask_directory": output.entity_id,
            "cell_measurement_table": measured.entity_id,
            "assay_readout": readout.entity_id,
            **{key: readout.properties.get(key) for key in (
                "readout", "z_prime", "ec50", "fit", "n_cells", "wells", "doses", "notes", "readout_directory")},
        })
        return
    for line in readout_lines(readout):
        click.echo(line)
    if not all_wells and "fit" in readout.properties["notes"]:
        click.echo("  (the quick subset holds control wells only; `mantle demo --all` fits the dose response)")


def _measure(entity_id: str):
    """Materialise cell_measurements and assay_readout of one partition (one Dagster run)."""
    from mantle_assets.orchestration.partitions import ensure_partition

    store, instance = _store(), _instance(quiet=_quiet())
    key = ensure_partition(instance, store.get(entity_id))
    result = _execute("measurement_job", "cell_measurements", {}, instance, key)
    measured, readout = (
        store.get(result.asset_materializations_for_node(node)[0].metadata["output_entity"].value)
        for node in ("cell_measurements", "assay_readout")
    )
    return measured, readout, result.run_id


def readout_lines(readout) -> list[str]:
    """An assay_readout entity as text: Z', the fit, the dose means and a plate grid of cells per well."""
    props = readout.properties
    notes = props.get("notes") or {}
    lines = [f"assay_readout {readout.entity_id}: median {props['readout']} per well, {props['n_cells']} cells"]
    z = props.get("z_prime")
    lines.append(f"  Z' = {z:.3f}" if z is not None else f"  Z': not computed ({notes.get('z_prime')})")
    fit = props.get("fit")
    if fit:
        low, high = fit["ec50_ci95"]
        r_squared = "n/a" if fit["r_squared"] is None else f"{fit['r_squared']:.3f}"
        lines.append(
            f"  EC50 = {fit['ec50']:.3g} dose units (95% CI {low:.3g}-{high:.3g}), Hill slope {fit['hill']:.3g}, "
            f"bottom {fit['bottom']:.3g}, top {fit['top']:.3g}, R² {r_squared}"
        )
    else:
        lines.append(f"  EC50: not computed ({notes.get('fit')})")
    if props.get("doses"):
        lines.append("  dose   mean     sd  wells")
        for dose in props["doses"]:
            sd = "" if dose["sd"] is None else format(dose["sd"], "6.3f")
            lines.append(f"  {dose['dose']:>4g} {dose['mean']:6.3f} {sd:>6}  {dose['n_wells']}")
    wells = {w["well"]: w for w in props["wells"]}
    rows = sorted({name[:-2] for name in wells}, key=lambda row: (len(row), row))
    columns = sorted({int(name[-2:]) for name in wells})
    lines.append("  cells per well:")
    lines.append("     " + "".join(f"{c:>6}" for c in columns))
    for row in rows:
        counts = [wells.get(f"{row}{c:02d}", {}).get("n_cells") for c in columns]
        lines.append(f"  {row:>2} " + "".join(f"{'-' if n is None else n:>6}" for n in counts))
    lines.append(f"  tables and plots: {props['readout_directory']}")
    return lines


WORKSPACE = """\
# Written by `mantle ui` on every start.
load_from:
  - python_module:
      module_name: mantle_assets.definitions
      attribute: defs
      location_name: mantle_assets
"""


@main.command()
@click.option("--port", type=int, default=3000, show_default=True)
def ui(port: int) -> None:
    """Start Dagster's webserver and daemon on 127.0.0.1 against Mantle's state.

    Runs launched in the UI, by `mantle segment` and by the daemon's sensors and schedule share
    $DAGSTER_HOME, and every step reads and writes the same $MANTLE_HOME. Requests for another
    Host than 127.0.0.1, localhost or [::1] (or $MANTLE_UI_ALLOWED_HOSTS), from another site's
    pages, and GraphQL mutations in the URL are refused (403).
    """
    from mantle_assets.webserver import DaemonExitedError, allowed_hosts, serve

    try:
        hosts = allowed_hosts(port)
    except ValueError as error:
        raise MantleCommandError(str(error)) from None
    home = dagster_home()
    workspace = home / "workspace.yaml"
    instance = _instance()
    workspace.write_text(WORKSPACE)
    click.echo(f"Dagster UI on http://127.0.0.1:{port} (DAGSTER_HOME={home}, MANTLE_HOME={mantle_home()})")
    sys.stdout.flush()
    try:
        serve(instance, workspace, port, hosts)
    except DaemonExitedError as error:
        raise MantleCommandError(str(error)) from None


@main.command()
@click.option("--train", "train_directories", multiple=True, required=True,
              help="Annotated directory as NAME=PATH (repeatable).")
@click.option("--val", "validation_directory", required=True, help="Annotated validation directory.")
@click.option("--hold-out-styles", "hold_out_styles_of", default=None,
              help="NAME of a --train set whose held-out acquisition styles are scored, never trained on.")
@click.option("--name", "model_name", default="mantle-nuclei", show_default=True)
@click.option("--epochs", "n_epochs", type=int, default=None)
@click.option("--nimg-per-epoch", type=int, default=None)
@click.option("--learning-rate", type=float, default=None)
@click.option("--diam-mean", type=float, default=None)
@click.option("--crop-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--weight", "weights", multiple=True, help="NAME=FRACTION: share of each epoch from a set.")
@click.option("--init", "initial_model", default=None, help="Model to continue training from (name or file).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Network arithmetic (default auto: bfloat16 on CPUs with AMX).")
def train(weights: tuple[str, ...], **options) -> None:
    """Train a Cellpose model (the trained_cellpose_model asset) and record it as an entity."""
    from mantle_assets.models.training import check_model_name
    from mantle_assets.orchestration.training import TrainingConfig

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if v is not None}
    config["set_weights"] = {name: float(share) for name, _, share in (w.partition("=") for w in weights)}
    TrainingConfig(**config)
    try:
        check_model_name(config["model_name"], "--name")  # before a run exists, so that a bad name records none
    except ValueError as error:
        raise MantleCommandError(str(error)) from None
    result = _execute("training_job", "trained_cellpose_model", config, _instance(quiet=_quiet()))
    metadata = result.asset_materializations_for_node("trained_cellpose_model")[0].metadata
    click.echo(
        f"{metadata['model_entity'].value}: {metadata['model_file'].value} "
        f"AP@0.5={metadata['ap50'].value:.3f} AP@0.75={metadata['ap75'].value:.3f}"
    )
    for style, scores in metadata["held_out_styles_ap"].value.items():
        click.echo(
            f"  held out {style} ({scores['n_images']} images): AP@0.5={scores['ap50']:.3f} "
            f"AP@0.75={scores['ap75']:.3f} AP@0.9={scores['ap90']:.3f}"
        )


@main.command()
@click.argument("model_entity_id")
@click.argument("name")
def bundle(model_entity_id: str, name: str) -> None:
    """Package trained cellpose_model MODEL_ENTITY_ID as bundled model NAME (for maintainers)."""
    from mantle_assets.models.bundling import bundle_model

    model = _store().get(model_entity_id)
    if model.data_type != "cellpose_model":
        raise MantleCommandError(f"{model_entity_id} is a {model.data_type}, not a cellpose_model")
    try:
        folder = bundle_model(Path(model.properties["model_file"]), name, dict(model.properties))
    except ValueError as error:
        raise MantleCommandError(str(error)) from None
    click.echo(str(folder))


if __name__ == "__main__":
    main()

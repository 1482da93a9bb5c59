"""Registering image directories and setting their segmentation defaults from the web UI's launchpad.

``mantle register`` and ``mantle defaults`` as Dagster jobs: a scientist types the config in the
launchpad, the run records what the command would, and its page shows what was found. A refusal
(a folder without images, an unknown channel name, a layout naming none of the wells) fails the
run with a ``dagster.Failure`` whose description is the one-line reason, and records nothing.
"""

import contextlib
from collections.abc import Iterator, Mapping

from dagster import (
    AssetObservation,
    Config,
    Failure,
    MetadataValue,
    OpExecutionContext,
    TableColumn,
    TableRecord,
    TableSchema,
    job,
    op,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from pydantic import Field

from mantle_assets.entities import Entity, EntityNotFoundError, EntityStore
from mantle_assets.imaging.segmentation import ParameterError, check_channels
from mantle_assets.orchestration.assets import image_directory_entity, image_directory_version
from mantle_assets.orchestration.config import SegmentationConfig, channel_numbers, coerce_segmentation_parameters
from mantle_assets.orchestration.partitions import ensure_partition
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.orchestration.retries import retried_while_store_busy
from mantle_assets.registration import (
    IMAGE_DIRECTORY,
    existing_registration,
    register_image_directory,
)

CHANNEL_PARAMETERS = ("nuclei_channel", "cytoplasm_channel")


def update_segmentation_defaults(
    store: EntityStore,
    parameters: Mapping,
    *,
    entity_id: str | None = None,
    experiment_name: str | None = None,
    run_id: str | None = None,
) -> list[tuple[Entity, SegmentationConfig]]:
    """Set default segmentation parameters of one image directory, or of every one of an experiment.

    What ``mantle defaults`` and the ``set_segmentation_defaults`` job do. The given parameters
    are merged over each entity's recorded defaults; automatic runs (the new-image-directory
    sensor, the nightly backfill) and runs launched without config use them.

    Parameters
    ----------
    store : EntityStore
        Where the image directories are recorded.
    parameters : Mapping
        Segmentation parameter name -> value, as a person writes them (see
        :func:`~mantle_assets.orchestration.config.coerce_segmentation_parameters`); ``None``
        leaves a parameter as recorded. A channel given by name is resolved per entity: DNA may
        be channel 2 of one plate and 1 of another.
    entity_id, experiment_name : str, optional
        Exactly one: the image directory, or the experiment whose unarchived image directories change.
    run_id : str, optional
        The run making the change, recorded in each entity's history.

    Returns
    -------
    list of (Entity, SegmentationConfig)
        Each changed entity and its defaults resolved over the platform's (every parameter set).

    Raises
    ------
    ValueError
        One line: neither or both of ``entity_id`` and ``experiment_name``, an experiment without
        image directories, a parameter of the wrong type, or (starting with the entity id) a
        parameter that does not fit an entity's images. Every entity is checked before any is
        changed, so a refusal leaves the experiment as it was.
    EntityNotFoundError
        If no entity has the id.
    """
    if (entity_id is None) == (experiment_name is None):
        raise ValueError("give either an entity id or an experiment name")
    targets = (
        [image_directory_entity(store, entity_id)]
        if entity_id
        else store.find(IMAGE_DIRECTORY, "experiment_name", [experiment_name])
    )
    if not targets:
        raise ValueError(f"no image directories in experiment {experiment_name!r}")
    given = coerce_segmentation_parameters({k: v for k, v in parameters.items() if v is not None})
    checked = []
    for entity in targets:
        try:
            merged = {**(entity.properties.get("segmentation_defaults") or {}), **channel_numbers(entity, given)}
            config = SegmentationConfig(**merged)
            config.settings()
            resolved = config.resolve()
            n_channels = (entity.properties.get("field_grouping") or {}).get("n_channels")
            check_channels(resolved.nuclei_channel, resolved.cytoplasm_channel, n_channels)
        except ValueError as error:
            raise ParameterError(f"{entity.entity_id}: {str(error).splitlines()[0]}") from None
        checked.append((entity, merged, resolved))
    return [
        (store.update(entity.entity_id, {"segmentation_defaults": merged}, run_id=run_id), resolved)
        for entity, merged, resolved in checked
    ]


@contextlib.contextmanager
def refusals_fail_the_run() -> Iterator[None]:
    """Turn the platform's one-line refusals into a ``Failure`` the run page shows, without a stack trace.

    A refusal is the same however often it is tried, so it is not retried.
    """
    try:
        yield
    except (ValueError, EntityNotFoundError) as error:
        raise Failure(description=str(error).splitlines()[0], allow_retries=False) from None


_DEFAULTS = (
    "Default segmentation parameters of the experiment's automatic runs, as for a segmentation run; "
    "channels may be given by name (DNA). Leave a parameter empty for the platform's default."
)


class RegistrationConfig(Config):
    directory: str = Field(
        description="The folder of images as the server sees it (/data/plates/plate1), or a URI such as "
        "s3://lab/plate1; its sub-folders are part of it."
    )
    experiment_name: str = Field(description="The experiment the plate belongs to, e.g. 'TNF dose response'.")
    name: str | None = Field(default=None, description="Entity name; the folder's name if empty.")
    channel_names: list[str] | None = Field(
        default=None,
        description="One name per channel, in order, e.g. [NFkB, DNA]; they name the measurement columns.",
    )
    plate_layout: str | None = Field(
        default=None,
        description="Path of the plate's CSV: well,dose,control[,treatment] (control -1/0/1), or BBBC014's layout.",
    )
    naming_pattern: str | None = Field(
        default=None,
        description="Only for file names no instrument scheme reads: a regular expression with named groups well "
        "(or row and column), field, channel, plane, timepoint, e.g. '(?P<well>[A-H]\\d+)-(?P<channel>GFP|DAPI)'.",
    )
    segmentation_defaults: SegmentationConfig = Field(default_factory=SegmentationConfig, description=_DEFAULTS)
    again: bool = Field(
        default=False,
        description="Register a new entity even if the directory is already registered (the CLI's --again).",
    )


def register_from_config(store: EntityStore, config: RegistrationConfig) -> tuple[Entity, bool]:
    """Register ``config.directory`` as ``mantle register`` does; return the entity and whether it was already.

    Raises
    ------
    ValueError
        One line naming the parameter or file (see
        :func:`~mantle_assets.registration.register_image_directory`); nothing is recorded.
    """
    defaults = coerce_segmentation_parameters(
        {k: v for k, v in config.segmentation_defaults.model_dump().items() if v is not None}, "segmentation_defaults"
    )
    # Channel names can only be read against the plate's channels, which registration does; the rest is
    # checked before any image is read.
    SegmentationConfig(**{k: v for k, v in defaults.items() if k not in CHANNEL_PARAMETERS}).settings()
    asked = {
        "experiment_name": config.experiment_name,
        "name": config.name,
        "channel_names": config.channel_names,
        "plate_layout": config.plate_layout,
        "naming_pattern": config.naming_pattern,
    }
    existing = None if config.again else existing_registration(store, config.directory, **asked)
    if existing is not None:
        if defaults:
            # The defaults are recorded with channel numbers: "DNA" asked again must match the 2 recorded.
            existing_registration(
                store, config.directory, **asked, segmentation_defaults=channel_numbers(existing, defaults)
            )
        return existing, True
    entity = register_image_directory(
        store, config.directory, segmentation_defaults=defaults or None, again=True, **asked
    )
    return entity, False


def registration_metadata(entity: Entity, already_registered: bool) -> dict:
    """What registration found, as the metadata of the partition's observation."""
    properties = entity.properties
    grouping = properties.get("field_grouping") or {}
    names = properties.get("channel_names") or []
    channels = [
        TableRecord({"channel": number, "label": label, "name": names[number - 1] if names else ""})
        for number, label in enumerate(grouping.get("channel_labels") or [], start=1)
    ]
    # Fields are sorted naturally by name, so their wells come in plate order.
    wells = list(dict.fromkeys(well for well in (grouping.get("wells") or {}).values() if well))
    layout = properties.get("plate_layout")
    return {
        "entity_id": MetadataValue.text(entity.entity_id),
        "summary": MetadataValue.text(grouping.get("summary") or ""),
        "directory": MetadataValue.path(properties["image_directory"]),
        "experiment_name": MetadataValue.text(properties.get("experiment_name") or ""),
        "fields": MetadataValue.int(grouping.get("n_fields") or 0),
        "channels": MetadataValue.table(
            records=channels,
            schema=TableSchema(
                columns=[TableColumn("channel", "int"), TableColumn("label", "string"), TableColumn("name", "string")]
            ),
        ),
        "wells": MetadataValue.text(", ".join(wells) if wells else "none (no well in the file names)"),
        "naming_scheme": MetadataValue.text(grouping.get("scheme") or ""),
        "naming_pattern": MetadataValue.text(grouping.get("naming_pattern") or "none"),
        "plate_layout": MetadataValue.path(layout) if layout else MetadataValue.text("none"),
        "segmentation_defaults": MetadataValue.json(properties.get("segmentation_defaults") or {}),
        "already_registered": MetadataValue.bool(already_registered),
    }


@op(name="register_directory", description="Registers config.directory and adds its partition.")
def register_image_directory_op(
    context: OpExecutionContext, config: RegistrationConfig, entity_store: EntityStoreResource
) -> None:
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout), refusals_fail_the_run():
        entity, already_registered = register_from_config(entity_store.store(), config)
        version = image_directory_version(entity.properties["image_directory"])
    summary = f"{entity.entity_id}: {entity.properties['field_grouping']['summary']}"
    if already_registered:
        context.log.warning(
            f"{config.directory} is already registered as {entity.entity_id}; set again: true to register it anew"
        )
    # Added here, not by the sensor's next tick: the partition is there when the run ends.
    key = ensure_partition(context.instance, entity)
    context.log_event(
        AssetObservation(
            IMAGE_DIRECTORY,
            partition=key,
            description=summary,
            metadata=registration_metadata(entity, already_registered),
            # The version the image_directory observation would record: the masks' staleness compares it.
            tags={DATA_VERSION_TAG: version.value},
        )
    )
    context.log.info(summary)


@job(
    name="register_image_directory",
    description="Register a plate from the launchpad, as `mantle register` does. Type under "
    "ops: register_directory: config: directory (a folder on the server or an s3:// URI) and "
    "experiment_name; optionally name, channel_names (e.g. [NFkB, DNA]), plate_layout (a CSV path), "
    "naming_pattern (a regex, only for names no instrument scheme reads) and segmentation_defaults "
    "(e.g. nuclei_channel: DNA, diameter: 12). The run adds the plate's partition (its entity id, experiment "
    "and name) and shows what was found - fields, channels, wells, naming scheme - as an observation of "
    "image_directory, also on the partition's page. A directory already registered is shown, not registered twice."
)
def register_image_directory_job():
    register_image_directory_op()


class SegmentationDefaultsConfig(Config):
    entity_id: str | None = Field(
        default=None, description="The image directory's entity id, e.g. E000012 (a partition key's start)."
    )
    experiment_name: str | None = Field(
        default=None, description="Instead of entity_id: every image directory of this experiment."
    )
    segmentation_defaults: SegmentationConfig = Field(
        default_factory=SegmentationConfig,
        description="The parameters to set; empty ones keep their recorded value. Channels may be given by name.",
    )


@op(name="set_defaults", description="Sets the segmentation defaults of an entity or an experiment.")
def set_segmentation_defaults_op(
    context: OpExecutionContext, config: SegmentationDefaultsConfig, entity_store: EntityStoreResource
) -> None:
    with retried_while_store_busy(seconds_to_wait=entity_store.lock_timeout), refusals_fail_the_run():
        updated = update_segmentation_defaults(
            entity_store.store(),
            config.segmentation_defaults.model_dump(),
            entity_id=config.entity_id,
            experiment_name=config.experiment_name,
            run_id=context.run_id,
        )
    for entity, resolved in updated:
        context.log.info(f"{entity.entity_id}: {resolved.model_dump()}")
    context.add_output_metadata(
        {
            "defaults": MetadataValue.table(
                records=[
                    TableRecord({"entity_id": entity.entity_id, "name": entity.name, **resolved.model_dump()})
                    for entity, resolved in updated
                ]
            )
        }
    )


@job(
    name="set_segmentation_defaults",
    description="Set the default segmentation parameters of a plate or an experiment, as `mantle defaults` "
    "does. Type under ops: set_defaults: config: entity_id (e.g. E000012) or experiment_name, "
    "and under segmentation_defaults the parameters to change (e.g. nuclei_channel: DNA, diameter: 12); "
    "the others keep their values. Automatic runs and runs launched without config use them.",
)
def set_segmentation_defaults_job():
    set_segmentation_defaults_op()

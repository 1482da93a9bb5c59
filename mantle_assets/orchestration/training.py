"""Training a Cellpose model as a tracked asset, with its data recorded as entities."""

from pathlib import Path

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from mantle_assets.atomic import atomic_directory, set_aside_on_failure
from mantle_assets.entities import EntityStore
from mantle_assets.imaging.segmentation import CellposeSegmenter
from mantle_assets.models.styles import split_annotated_by_style
from mantle_assets.models.training import (
    TrainingParameters,
    check_model_name,
    evaluate_segmenter,
    evaluate_styles,
    load_annotated_set,
    parse_named_path,
    sets_by_style,
    train_cellpose_model,
)
from mantle_assets.orchestration.assets import GPU_OP_TAGS
from mantle_assets.orchestration.recovery import check_run_not_ended
from mantle_assets.orchestration.resources import EntityStoreResource
from mantle_assets.orchestration.retries import refusals_as_failures
from mantle_assets.settings import mantle_home, max_field_pixels

TRAINING_PIPELINE = "cellpose-training"
ANNOTATED = "annotated_image_directory"


class TrainingConfig(Config):
    train_directories: list[str] = Field(
        description="Annotated directories as NAME=PATH (images/ + masks/, or Cellpose's _masks naming)."
    )
    validation_directory: str = Field(description="Annotated directory scored after training (never trained on).")
    hold_out_styles_of: str | None = Field(
        default=None,
        description="NAME of a training directory split by acquisition style: its held-out styles are never "
        "trained on and are scored after training, each on its own (mantle_assets.models.styles).",
    )
    model_name: str = "mantle-nuclei"
    n_epochs: int = TrainingParameters.n_epochs
    learning_rate: float = TrainingParameters.learning_rate
    weight_decay: float = TrainingParameters.weight_decay
    batch_size: int = TrainingParameters.batch_size
    nimg_per_epoch: int = TrainingParameters.nimg_per_epoch
    diam_mean: float = TrainingParameters.diam_mean
    crop_size: int = TrainingParameters.crop_size
    seed: int = TrainingParameters.seed
    size_epochs: int = TrainingParameters.size_epochs
    size_nimg_per_epoch: int = TrainingParameters.size_nimg_per_epoch
    size_crop_size: int = TrainingParameters.size_crop_size
    set_weights: dict[str, float] = Field(
        default_factory=dict, description="Share of each epoch drawn from a named training set."
    )
    initial_model: str | None = Field(
        default=None, description="Model to continue training from (name or file); none trains from scratch."
    )
    precision: str = Field(
        default=TrainingParameters.precision,
        description="Network arithmetic: float32, bfloat16 (mixed precision) or auto (bfloat16 on AMX CPUs).",
    )

    def parameters(self) -> TrainingParameters:
        return TrainingParameters(
            **self.model_dump(
                exclude={"train_directories", "validation_directory", "model_name", "hold_out_styles_of"}
            )
        )


def annotated_entity(store: EntityStore, name: str, directory: Path, annotated) -> str:
    """The entity of an annotated directory, registered on first use."""
    resolved = str(directory.resolve())
    for entity in store.list(ANNOTATED):
        if entity.properties["annotated_directory"] == resolved:
            return entity.entity_id
    n_objects = int(sum(len(set(m.ravel().tolist())) - 1 for m in annotated.masks))
    return store.register(
        ANNOTATED,
        name,
        {"annotated_directory": resolved, "n_images": len(annotated), "n_objects": n_objects},
    ).entity_id


def hold_out_styles(train_sets: dict, name: str | None) -> tuple[dict, list[str]]:
    """Split training set ``name`` by acquisition style, in place: its held-out styles leave ``train_sets``.

    Returns
    -------
    (dict of str to AnnotatedSet, list of str)
        The held-out styles by name (``<name>/style<k>``) and a description of each; empty without ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not one of the training sets.
    """
    if name is None:
        return {}, []
    if name not in train_sets:
        raise ValueError(f"hold_out_styles_of={name!r} is not a training set name: use one of {', '.join(train_sets)}")
    annotated = train_sets[name]
    split = split_annotated_by_style(annotated.images, annotated.masks)
    train_sets[name] = annotated.subset(split.train)
    held_out = sets_by_style(name, annotated, split)[1]
    return held_out, [f"{name}/{split.clusters.describe(k)}" for k in split.held_out]


@asset(
    group_name="models",
    kinds={"cellpose", "pytorch", "duckdb"},
    owners=["team:imaging"],
    pool="gpu",
    op_tags=GPU_OP_TAGS,
    description="A Cellpose 3 model trained from annotated nuclei with cellpose.train.train_seg, "
    "scored on a validation set (AP at IoU 0.5/0.75/0.9) and recorded as a cellpose_model entity.",
)
def trained_cellpose_model(
    context: AssetExecutionContext, config: TrainingConfig, entity_store: EntityStoreResource
) -> MaterializeResult:
    with refusals_as_failures():
        # The name becomes folders under $MANTLE_HOME/models, created before training starts.
        check_model_name(config.model_name)
        named = [parse_named_path(text) for text in config.train_directories]
        max_pixels = max_field_pixels()
        train_sets = {name: load_annotated_set(path, max_pixels=max_pixels) for name, path in named}
        validation_path = Path(config.validation_directory)
        validation = load_annotated_set(validation_path, max_pixels=max_pixels)
        held_out, held_out_described = hold_out_styles(train_sets, config.hold_out_styles_of)
    store = entity_store.store()

    run_id = context.run.run_id
    final = mantle_home() / "models" / config.model_name / run_id
    params = config.parameters()
    with atomic_directory(final) as partial:
        trained = train_cellpose_model(train_sets, partial, config.model_name, params)
    weights = final / "models" / config.model_name
    # Training took up to hours: if scoring or recording fails, the weights are kept aside, not deleted.
    with set_aside_on_failure(final):
        segmenter = CellposeSegmenter(weights, precision=params.precision)
        scores = evaluate_segmenter(segmenter, validation)
        context.log.info(f"validation {validation_path.name}: {scores}")
        style_scores = evaluate_styles(segmenter, held_out) if held_out else {}
        for name, style in style_scores.items():
            context.log.info(f"held-out style {name}: {style}")
        train_ids = [annotated_entity(store, name, path, train_sets[name]) for name, path in named]
        validation_id = annotated_entity(store, validation_path.name, validation_path, validation)
        model = store.record_output(
            "cellpose_model",
            config.model_name,
            {
                "model_file": str(weights),
                "training_entities": train_ids,
                "validation_entity": validation_id,
                "hyperparameters": params.__dict__,
                "seed": params.seed,
                "epochs": params.n_epochs,
                "wall_seconds": trained.wall_seconds,
                "hardware": trained.hardware,
                "precision": trained.precision,
                "diam_mean": trained.diam_mean,
                "diam_labels": trained.diam_labels,
                "validation_ap": scores,
                "held_out_styles": {"styles": held_out_described, "ap": style_scores},
            },
            parents=train_ids,
            pipeline=TRAINING_PIPELINE,
            run_id=run_id,
            parameters=params.__dict__,
            before_writing=lambda: check_run_not_ended(context.instance, run_id),
        )
    return MaterializeResult(
        metadata={
            "model_entity": model.entity_id,
            "model_file": MetadataValue.path(str(weights)),
            "training_entities": MetadataValue.json(train_ids),
            "validation_entity": validation_id,
            "ap50": scores["ap50"],
            "ap75": scores["ap75"],
            "ap90": scores["ap90"],
            "small_object_recall": MetadataValue.json(
                {"recall": scores["small_object_recall"], "objects": scores["n_small_objects"]}
            ),
            "diameter_median_relative_error": scores["diameter_median_relative_error"],
            "held_out_styles_ap": MetadataValue.json(
                {
                    name: {k: style[k] for k in ("ap50", "ap75", "ap90", "n_images")}
                    for name, style in style_scores.items()
                }
            ),
            "wall_seconds": trained.wall_seconds,
            "hardware": trained.hardware,
            "precision": trained.precision,
            "final_train_loss": trained.final_train_loss,
        }
    )

"""Training and evaluating Cellpose models on annotated nuclei.

Framework-free: arrays and paths in, a model file and figures out. The Dagster
asset and the ``mantle train`` command call these functions.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mantle_assets.imaging.io import MAX_FIELD_PIXELS, read_image, read_label_image
from mantle_assets.imaging.precision import run_network_in
from mantle_assets.models.cellpose_import import import_cellpose
from mantle_assets.models.styles import StyleSplit
from mantle_assets.settings import check_data_path

AP_THRESHOLDS = (0.5, 0.75, 0.9)
# A model's name becomes a folder and a file name ($MANTLE_HOME/models/<name>/, bundled/<name>/<name>): a simple
# name, never a path. The first character may not be "." or "-", so that it is neither ".." nor an option.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Objects below this area (px) are "small" for small_object_recall: BBBC039's micronuclei.
SMALL_OBJECT_AREA = 60


@dataclass(frozen=True)
class AnnotatedSet:
    """Images with their instance masks, in matching order."""

    names: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices) -> AnnotatedSet:
        """The images at ``indices``, in that order."""
        return AnnotatedSet(
            [self.names[i] for i in indices], [self.images[i] for i in indices], [self.masks[i] for i in indices]
        )


def sets_by_style(name: str, annotated: AnnotatedSet, split: StyleSplit) -> tuple[dict, dict]:
    """One annotated set per acquisition style, named ``<name>/style<k>``: the training styles and the held-out ones.

    Returns
    -------
    (dict of str to AnnotatedSet, dict of str to AnnotatedSet)
        Styles to train on, and styles held out (never trained on), each in style order.
    """
    labels = split.clusters.labels
    by_style = {k: annotated.subset(np.flatnonzero(labels == k)) for k in range(len(split.clusters.centres))}
    train = {f"{name}/style{k}": s for k, s in by_style.items() if k not in split.held_out}
    held_out = {f"{name}/style{k}": s for k, s in by_style.items() if k in split.held_out}
    return train, held_out


def check_model_name(name: str, what: str = "model_name") -> str:
    """Refuse a model name that is not a simple name: 1-100 letters, digits, ``.``, ``_``, ``-``, no ``/``.

    Raises
    ------
    ValueError
        One line naming the parameter and the value.
    """
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            f"got {name!r}"
        )
    return name


def find_annotated_pairs(directory: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair each annotated image with its mask file.

    Two layouts are understood: ``images/<name>.tif`` beside ``masks/<name>.tif``
    (the layout of ``shared/data/nuclei_gt``), and Cellpose's own flat layout
    ``<name>.tif`` beside ``<name>_masks.tif`` (or ``_seg``-less ``_cp_masks``).

    Parameters
    ----------
    directory : path
        The annotated directory.

    Returns
    -------
    list of (image_path, mask_path)
        Sorted by image name.

    Raises
    ------
    ValueError
        If the directory holds no image with a mask.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"annotated directory not found: {root}")
    pairs: list[tuple[Path, Path]] = []
    if (root / "images").is_dir() and (root / "masks").is_dir():
        masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file()}
        for image in sorted((root / "images").iterdir()):
            if image.is_file() and image.stem in masks:
                pairs.append((image, masks[image.stem]))
    else:
        files = {p.stem: p for p in root.iterdir() if p.is_file()}
        for stem, image in sorted(files.items()):
            if stem.endswith("_masks"):
                continue
            mask = files.get(f"{stem}_masks") or files.get(f"{stem}_cp_masks")
            if mask is not None:
                pairs.append((image, mask))
    if not pairs:
        raise ValueError(
            f"no annotated images in {root}: expected images/ and masks/ folders "
            "or <name>.tif with <name>_masks.tif"
        )
    return pairs


def load_annotated_set(directory: str | os.PathLike, *, max_pixels: int = MAX_FIELD_PIXELS) -> AnnotatedSet:
    """Read every image/mask pair of an annotated directory.

    Multi-channel images are reduced to their first channel: the annotated
    sets are single-stain nuclei images.

    Parameters
    ----------
    directory : path
        The annotated directory (see :func:`find_annotated_pairs`).
    max_pixels : int
        The most pixels an image or mask may have.

    Returns
    -------
    AnnotatedSet
        ``(Y, X)`` float32 images and int32 masks.

    Raises
    ------
    OutsideDataRootsError
        If the directory, an image or a mask lies outside the data roots (see
        :func:`~mantle_assets.settings.check_data_path`; symbolic links followed).
    ValueError
        One line naming the file: an image or mask the reader refuses (an
        :class:`~mantle_assets.imaging.io.ImageReadError`: unreadable,
        truncated, of an unsupported pixel type or over ``max_pixels``), or a
        mask of another shape than its image.
    """
    names, images, masks = [], [], []
    for image_path, mask_path in find_annotated_pairs(check_data_path(directory, "annotated directory")):
        check_data_path(image_path, "annotated image")
        check_data_path(mask_path, "annotated mask")
        image = read_image(image_path, max_pixels=max_pixels).pixels[0]
        mask = read_label_image(mask_path, max_pixels=max_pixels)
        if mask.shape != image.shape:
            raise ValueError(
                f"{mask_path}: mask shape {mask.shape} differs from image shape {image.shape}"
            )
        names.append(image_path.stem)
        images.append(image.astype(np.float32))
        masks.append(mask.astype(np.int32))
    return AnnotatedSet(names, images, masks)


@dataclass(frozen=True)
class TrainingParameters:
    """Hyper-parameters of one Cellpose training run (all recorded with the model)."""

    n_epochs: int = 120
    learning_rate: float = 0.005
    weight_decay: float = 1e-5
    batch_size: int = 8
    nimg_per_epoch: int = 48
    diam_mean: float = 17.0
    crop_size: int = 224
    seed: int = 0
    min_train_masks: int = 5
    # Cellpose's size model (style -> diameter regression) for diameter=None.
    size_epochs: int = 5
    size_nimg_per_epoch: int = 100
    size_crop_size: int = 512
    # Share of each epoch's crops drawn from each training set, by set name;
    # sets not named share the rest in proportion to their size.
    set_weights: dict[str, float] = field(default_factory=dict)
    # A model to continue training from (name or file, as cellpose_model accepts); None trains from scratch.
    initial_model: str | None = None
    # Network arithmetic (see mantle_assets.imaging.precision); "auto" is bfloat16 on AMX CPUs.
    precision: str = "auto"
    # Objects under this area (px) do not count towards an image's diameter in train_augmented's rescaling:
    # annotated micronuclei would otherwise shrink it and blow the nuclei up. 0 counts all, as Cellpose does.
    diameter_min_area: int = 0
    # In train_augmented's loss the pixels of an object weigh median object area of its image / its area, at least
    # 1 and at most this (see object_weights), so micronuclei are not lost among nuclei; 1 weighs all pixels alike.
    object_weight_max: float = 1.0


def sampling_probabilities(
    set_sizes: dict[str, int], set_weights: dict[str, float], *, balanced: bool = False
) -> np.ndarray:
    """Per-image sampling probabilities that give each set its share of an epoch.

    Parameters
    ----------
    set_sizes : dict of str to int
        Number of images of each training set, in concatenation order.
    set_weights : dict of str to float
        Share of samples for named sets (summing to at most 1).
    balanced : bool
        Whether the sets not named share the rest equally (each acquisition style as
        often as any other) instead of in proportion to their size.

    Returns
    -------
    ndarray
        One probability per image, summing to 1.

    Examples
    --------
    >>> sampling_probabilities({"a": 2, "b": 6}, {"a": 0.5}).round(3).tolist()
    [0.25, 0.25, 0.083, 0.083, 0.083, 0.083, 0.083, 0.083]
    >>> sampling_probabilities({"a": 1, "b": 1, "c": 2}, {}, balanced=True).round(3).tolist()
    [0.333, 0.333, 0.167, 0.167]
    """
    named = sum(set_weights.get(name, 0.0) for name in set_sizes)
    if named > 1.0 + 1e-9:
        raise ValueError(f"set weights sum to {named:.3f} > 1")
    unnamed = {name: (1 if balanced else n) for name, n in set_sizes.items() if name not in set_weights}
    unnamed_total = sum(unnamed.values())
    probabilities = []
    for name, size in set_sizes.items():
        if name in set_weights:
            share = set_weights[name]
        else:
            share = (1.0 - named) * unnamed[name] / unnamed_total if unnamed_total else 0.0
        probabilities.extend([share / size] * size)
    p = np.asarray(probabilities, dtype=np.float64)
    return p / p.sum()


def scale_diameter(mask: np.ndarray, min_area: int = 0) -> float:
    """An image's object diameter as Cellpose's training rescales by it, leaving out objects under ``min_area``.

    Cellpose (``utils.diameters``, ``train._process_train_test``) takes the median over objects of
    ``sqrt(area)``, divided by ``sqrt(pi) / 2`` (a disc's diameter), and at least 5 px.

    Parameters
    ----------
    mask : ndarray
        Instance labels, 0 = background.
    min_area : int
        Objects with fewer pixels do not count; 0 counts every object.

    Returns
    -------
    float
        The diameter in pixels (5 if no object counts).

    Examples
    --------
    >>> mask = np.zeros((40, 40), int); mask[:10, :10] = 1; mask[20:22, 20:22] = 2; mask[30:32, 30:32] = 3
    >>> round(scale_diameter(mask), 2), round(scale_diameter(mask, min_area=10), 2)
    (5.0, 11.28)
    """
    areas = np.bincount(mask.ravel())[1:]
    areas = areas[(areas > 0) & (areas >= min_area)]
    if areas.size == 0:
        return 5.0
    return max(float(np.median(np.sqrt(areas))) / (np.pi**0.5 / 2), 5.0)


def object_weights(mask: np.ndarray, max_weight: float) -> np.ndarray:
    """Per-pixel loss weights that give an object smaller than its image's median the weight of a median one.

    A pixel of an object of area ``a`` weighs ``median / a`` (the median object area of the image),
    clipped to ``[1, max_weight]``; background and objects at or above the median weigh 1.

    Parameters
    ----------
    mask : ndarray
        Instance labels, 0 = background.
    max_weight : float
        The largest weight (>= 1); 1 gives every pixel weight 1.

    Returns
    -------
    ndarray
        float32 weights, the shape of ``mask``.

    Examples
    --------
    >>> mask = np.zeros((20, 20), int); mask[:10, :10] = 1; mask[12:14, 12:14] = 2; mask[15:19, 15:19] = 3
    >>> w = object_weights(mask, 3.0); [float(w[p]) for p in ((0, 0), (12, 12), (16, 16), (19, 0))]
    [1.0, 3.0, 1.0, 1.0]
    """
    if max_weight < 1.0:
        raise ValueError(f"object_weight_max must be at least 1, got {max_weight}")
    areas = np.bincount(mask.ravel()).astype(np.float64)
    per_label = np.ones(areas.size, np.float32)
    present = np.flatnonzero(areas[1:]) + 1
    if present.size:
        ratio = np.median(areas[present]) / areas[present]
        per_label[present] = np.clip(ratio, 1.0, max_weight)
    return per_label[mask]


def weighted_segmentation_loss(labels, output, weights):
    """Cellpose's segmentation loss (``cellpose.train._loss_fn_seg``) with a weight per pixel.

    The flow term (mean squared error against 5x the flows, halved) and the cell-probability term
    (binary cross-entropy against ``cellprob > 0.5``) are each a weighted mean over pixels; with all
    weights equal it is Cellpose's loss.

    Parameters
    ----------
    labels : torch.Tensor
        ``(B, 3, Y, X)``: cell probability, flow Y, flow X, as Cellpose's training labels.
    output : torch.Tensor
        The network's ``(B, 3, Y, X)`` output: flow Y, flow X, cell-probability logit.
    weights : torch.Tensor
        ``(B, Y, X)`` non-negative pixel weights, not all 0.

    Returns
    -------
    torch.Tensor
        The scalar loss.
    """
    import torch.nn.functional as F

    w = weights / weights.mean()
    flow_error = ((output[:, :2] - 5.0 * labels[:, 1:]) ** 2).mean(dim=1)
    cell_error = F.binary_cross_entropy_with_logits(output[:, -1], (labels[:, 0] > 0.5).float(), reduction="none")
    return (w * flow_error).mean() / 2.0 + (w * cell_error).mean()


@dataclass(frozen=True)
class TrainingResult:
    model_path: Path
    wall_seconds: float
    diam_mean: float
    diam_labels: float
    final_train_loss: float
    hardware: str
    n_train_images: int
    precision: str


def describe_hardware() -> str:
    """A short description of the device torch trains on."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def train_cellpose_model(
    train_sets: dict[str, AnnotatedSet],
    output_dir: str | os.PathLike,
    model_name: str,
    params: TrainingParameters = TrainingParameters(),
) -> TrainingResult:
    """Train a standard Cellpose 3 network, from scratch or from ``params.initial_model``, and its size model.

    ``cellpose.train.train_seg`` trains the network; ``cellpose.train.train_size``
    then fits the style-to-diameter regression Cellpose's ``SizeModel`` uses,
    saved beside the weights as ``<model>_size.npy``, so ``diameter=None``
    works as it does with Cellpose's built-in models.

    Parameters
    ----------
    train_sets : dict of str to AnnotatedSet
        Training sets by name (names are used by ``params.set_weights``).
    output_dir : path
        Cellpose writes ``<output_dir>/models/<model_name>``, overwriting it
        every 10 epochs as a checkpoint.
    model_name : str
        File name of the model.
    params : TrainingParameters
        Hyper-parameters.

    Returns
    -------
    TrainingResult
    """
    import torch
    import_cellpose()
    from cellpose import models, train

    np.random.seed(params.seed)
    torch.manual_seed(params.seed)
    images = [im for s in train_sets.values() for im in s.images]
    masks = [m for s in train_sets.values() for m in s.masks]
    probabilities = sampling_probabilities(
        {name: len(s) for name, s in train_sets.items()}, params.set_weights
    )
    model = models.CellposeModel(
        gpu=torch.cuda.is_available(), pretrained_model=initial_weights(params), diam_mean=params.diam_mean
    )
    precision = run_network_in(model.net, params.precision)
    start = time.perf_counter()
    model_path, train_losses, _ = train.train_seg(
        model.net,
        train_data=images,
        train_labels=masks,
        train_probs=probabilities,
        channels=[0, 0],
        batch_size=params.batch_size,
        learning_rate=params.learning_rate,
        weight_decay=params.weight_decay,
        n_epochs=params.n_epochs,
        nimg_per_epoch=params.nimg_per_epoch,
        bsize=params.crop_size,
        min_train_masks=params.min_train_masks,
        save_path=str(output_dir),
        save_every=10,
        model_name=model_name,
    )
    train_size_model(model.net, Path(model_path), images, masks, probabilities, params)
    wall = time.perf_counter() - start
    return TrainingResult(
        model_path=Path(model_path),
        wall_seconds=wall,
        diam_mean=float(model.net.diam_mean.item()),
        diam_labels=float(model.net.diam_labels.item()),
        final_train_loss=float(train_losses[-1]),
        hardware=describe_hardware(),
        n_train_images=len(images),
        precision=precision,
    )


def initial_weights(params: TrainingParameters) -> str | bool:
    """The weights file training starts from, or ``False`` for a fresh network.

    Raises
    ------
    ValueError
        If the initial model's ``diam_mean`` differs from ``params.diam_mean``
        (Cellpose rescales training images to the network's own scale).
    """
    if params.initial_model is None:
        return False
    from mantle_assets.models.registry import resolve_model

    spec = resolve_model(params.initial_model)
    if spec.diam_mean is not None and abs(spec.diam_mean - params.diam_mean) > 1e-6:
        raise ValueError(
            f"diam_mean={params.diam_mean:g} but initial_model {params.initial_model!r} was trained "
            f"at diam_mean={spec.diam_mean:g}"
        )
    return str(spec.path)


def train_size_model(net, weights: Path, images, masks, probabilities, params: TrainingParameters) -> Path:
    """Fit Cellpose's size model for trained weights with ``cellpose.train.train_size``.

    Returns
    -------
    Path
        ``<weights>_size.npy``, which ``cellpose.models.SizeModel`` reads.
    """
    import_cellpose()
    from cellpose import train

    train.train_size(
        net,
        str(weights),
        train_data=images,
        train_labels=masks,
        train_probs=probabilities,
        channels=[0, 0],
        nimg_per_epoch=params.size_nimg_per_epoch,
        n_epochs=params.size_epochs,
        # Cellpose's default of 64 crops of 512 px per forward pass needs over 24 GB on a CPU.
        batch_size=params.batch_size,
        bsize=params.size_crop_size,
        min_train_masks=params.min_train_masks,
    )
    return weights.with_name(weights.name + "_size.npy")


@dataclass(frozen=True)
class Augmentation:
    """Random changes to each training crop, beyond Cellpose's rotations and flips.

    Intensity changes are applied to the crop Cellpose's normalisation made (1st/99th
    percentile at 0/1), and the crop is normalised again (``renormalise``), as inference normalises an image:
    so what is learnt is what survives normalisation (a nonlinear response, a background
    that is uneven or high against the signal, blur, noise), not an overall gain.
    Each change is applied to a crop with probability ``probability``.
    """

    # Cellpose resizes each crop by (1 - scale_range / 2) + scale_range * U(0, 1) around the
    # rescaling to diam_mean; train_seg uses 0.5 (+-25 %).
    scale_range: float = 1.0
    probability: float = 0.5
    # Gamma drawn log-uniformly from [1 / max_gamma, max_gamma].
    max_gamma: float = 2.0
    # A background offset of up to this share of the signal, tilted across the crop.
    max_background: float = 0.5
    # Gaussian blur of up to this sigma, in pixels of the crop.
    max_blur_sigma: float = 2.0
    # Gaussian noise of up to this standard deviation, as a share of the signal.
    max_noise: float = 0.15
    # Whether the changed crop is normalised to its own 1st/99th percentiles; without it the crop keeps the
    # whole image's normalisation, which is what inference applies (and, with probability 0, what train_seg sees).
    renormalise: bool = True

    def to_json(self) -> dict:
        return dict(self.__dict__)


def augment_intensity(crop: np.ndarray, rng: np.random.Generator, augmentation: Augmentation) -> np.ndarray:
    """Change a normalised training crop's intensities at random, then normalise it again.

    Parameters
    ----------
    crop : ndarray
        ``(C, Y, X)`` float crop; channel 0 is the stain, further channels (Cellpose's empty
        second channel) are left as they are.
    rng : numpy.random.Generator
        Source of all random draws (the result is a function of the crop and the generator's state).
    augmentation : Augmentation
        Ranges and probability.

    Returns
    -------
    ndarray
        The crop, float32. With ``augmentation.renormalise``, channel 0 is clipped at 0 and normalised
        to its 1st/99th percentiles (0 and 1) like ``cellpose.transforms.normalize99`` (a flat crop stays
        flat); without it, channel 0 keeps the crop's scale, and a crop no change was drawn for is returned
        as it came.
    """
    from scipy.ndimage import gaussian_filter

    out = crop.astype(np.float32, copy=True)
    x = np.clip(out[0], 0.0, None) if augmentation.renormalise else out[0]
    draw = rng.random(4) < augmentation.probability
    if draw[0]:
        # Gamma is defined on non-negative values; whole-image normalisation leaves some below 0.
        x = np.clip(x, 0.0, None) ** np.exp(rng.uniform(-1.0, 1.0) * np.log(augmentation.max_gamma))
    if draw[1]:
        tilt = rng.uniform(-1.0, 1.0, 2)
        ys, xs = np.linspace(-0.5, 0.5, x.shape[0]), np.linspace(-0.5, 0.5, x.shape[1])
        gradient = 1.0 + tilt[0] * ys[:, None] + tilt[1] * xs[None, :]
        x = x + rng.uniform(0.0, augmentation.max_background) * gradient
    if draw[2]:
        x = gaussian_filter(x, rng.uniform(0.0, augmentation.max_blur_sigma))
    if draw[3]:
        x = x + rng.normal(0.0, rng.uniform(0.0, augmentation.max_noise), x.shape)
    if augmentation.renormalise:
        low, high = np.percentile(x, [1.0, 99.0])
        x = (x - low) / (high - low) if high - low > 1e-6 else x - low
    out[0] = x
    return out


@dataclass(frozen=True)
class LoopResult:
    model_path: Path
    steps: int
    wall_seconds: float
    losses: list[float]
    diam_labels: float
    hardware: str
    precision: str


def learning_rate_at(step: int, n_steps: int, learning_rate: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``n_steps``.

    >>> [round(learning_rate_at(s, 10, 1.0, 2), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(n_steps - warmup_steps, 1)
    return float(learning_rate * 0.5 * (1.0 + np.cos(np.pi * min(progress, 1.0))))


def train_augmented(
    train_sets: dict[str, AnnotatedSet],
    work_dir: str | os.PathLike,
    model_name: str,
    params: TrainingParameters,
    augmentation: Augmentation = Augmentation(),
    *,
    n_steps: int,
    balanced: bool = True,
    warmup_steps: int = 20,
    checkpoint_seconds: float = 300.0,
    log=print,
) -> LoopResult:
    """Train a Cellpose 3 network with :class:`Augmentation`, checkpointing so that it can resume.

    Cellpose's own pieces do the Cellpose parts: ``cellpose.train._process_train_test``
    (normalisation, flows, diameters, dropping images under ``params.min_train_masks``),
    ``cellpose.transforms.random_rotate_and_resize`` (with ``augmentation.scale_range``) and
    ``cellpose.train._loss_fn_seg`` (:func:`weighted_segmentation_loss` with
    :func:`object_weights` when ``params.object_weight_max`` > 1); the loop adds :func:`augment_intensity`, balanced
    sampling (:func:`sampling_probabilities`) and the schedule of :func:`learning_rate_at`
    (AdamW). The weights are a standard Cellpose file (``CellposeModel(pretrained_model=FILE)``).

    Parameters
    ----------
    train_sets : dict of str to AnnotatedSet
        Training sets by name (e.g. one per acquisition style; ``params.set_weights`` names some).
    work_dir : path
        Holds ``models/<model_name>`` (the weights, rewritten at each checkpoint),
        ``checkpoint.pt`` (weights, optimiser, step, losses) and ``prepared.pt`` (the normalised
        images, flows and object weights, computed once). A ``checkpoint.pt`` present is resumed from.
    model_name : str
        File name of the weights.
    params : TrainingParameters
        ``learning_rate``, ``weight_decay``, ``batch_size``, ``crop_size``, ``diam_mean``,
        ``seed``, ``min_train_masks``, ``set_weights``, ``initial_model``, ``precision``,
        ``diameter_min_area`` (see :func:`scale_diameter`) and ``object_weight_max`` apply.
    augmentation : Augmentation
    n_steps : int
        Batches to train on in all (resumed runs count the steps already done).
    balanced : bool
        Sets not in ``params.set_weights`` share the rest of each batch equally.
    warmup_steps : int
        Steps of linear learning-rate warm-up.
    checkpoint_seconds : float
        Wall time between checkpoints.
    log : callable
        Receives one progress line per checkpoint.

    Returns
    -------
    LoopResult

    Raises
    ------
    ValueError
        If ``prepared.pt`` holds object weights of another ``object_weight_max``.
    """
    import torch
    import_cellpose()
    from cellpose import models, train, transforms

    check_model_name(model_name)
    work = Path(work_dir)
    (work / "models").mkdir(parents=True, exist_ok=True)
    model_path = work / "models" / model_name
    checkpoint_path, prepared_path = work / "checkpoint.pt", work / "prepared.pt"
    torch.manual_seed(params.seed)
    model = models.CellposeModel(
        gpu=torch.cuda.is_available(), pretrained_model=initial_weights(params), diam_mean=params.diam_mean
    )
    net, device = model.net, model.net.device
    if prepared_path.is_file():
        prepared = torch.load(prepared_path, weights_only=False)
    else:
        images = [im for s in train_sets.values() for im in s.images]
        masks = [m for s in train_sets.values() for m in s.masks]
        probabilities = sampling_probabilities(
            {name: len(s) for name, s in train_sets.items()}, params.set_weights, balanced=balanced
        )
        # Images with too few objects are dropped here, as Cellpose would, so that diameters match images one to one.
        counts = [np.count_nonzero(np.bincount(m.ravel())[1:]) for m in masks]
        keep = [k for k, count in enumerate(counts) if count >= params.min_train_masks]
        if len(keep) < len(masks):
            log(f"{len(masks) - len(keep)} images with fewer than {params.min_train_masks} objects left out")
        out = train._process_train_test(
            train_data=[images[k] for k in keep], train_labels=[masks[k] for k in keep],
            train_probs=probabilities[keep] / probabilities[keep].sum(), min_train_masks=0,
            channels=[0, 0], normalize_params={**models.normalize_default, "normalize": True}, device=device,
        )
        diameters = out[5]
        if params.diameter_min_area > 0:
            diameters = np.array([scale_diameter(masks[k], params.diameter_min_area) for k in keep])
        # Kept in float16 (half the memory of ~650 images with their flows), widened per batch.
        prepared = {"data": [d.astype(np.float16) for d in out[0]],
                    "labels": [lbl[1:].astype(np.float16) for lbl in out[1]], "probs": out[4], "diams": diameters}
        if params.object_weight_max != 1.0:  # object_weights refuses a maximum under 1
            prepared["object_weights"] = [object_weights(masks[k], params.object_weight_max).astype(np.float16)
                                          for k in keep]
            prepared["object_weight_max"] = params.object_weight_max
        torch.save(prepared, prepared_path.with_suffix(".partial"))
        os.replace(prepared_path.with_suffix(".partial"), prepared_path)
    if prepared.get("object_weight_max", 1.0) != params.object_weight_max:
        raise ValueError(f"{prepared_path} holds object weights for object_weight_max "
                         f"{prepared.get('object_weight_max', 1.0)}, not {params.object_weight_max}: "
                         "use a new work folder or delete it")
    weighted = "object_weights" in prepared
    net.diam_labels.data = torch.tensor([float(np.mean(prepared["diams"]))], device=device)
    precision = run_network_in(net, params.precision)
    optimizer = torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    step, losses, elapsed = 0, [], 0.0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, elapsed = state["step"], state["losses"], state["wall_seconds"]
        log(f"resumed at step {step} of {n_steps}")

    def save() -> None:
        net.save_model(str(model_path.with_suffix(".partial")))
        os.replace(model_path.with_suffix(".partial"), model_path)
        state = {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                 "wall_seconds": elapsed + time.perf_counter() - start}
        torch.save(state, checkpoint_path.with_suffix(".partial"))
        os.replace(checkpoint_path.with_suffix(".partial"), checkpoint_path)

    start = last_save = time.perf_counter()
    net.train()
    while step < n_steps:
        # Every step's draws follow from (seed, step) alone, so a resumed run draws what an uninterrupted one would.
        rng = np.random.default_rng([params.seed, step])
        np.random.seed(rng.integers(2**31))
        indices = rng.choice(len(prepared["data"]), size=params.batch_size, p=prepared["probs"])
        targets = [prepared["labels"][i].astype(np.float32) for i in indices]
        if weighted:
            # Cellpose rotates the last two channels as flows and warps the first one nearest-neighbour; the cell
            # probability, second now, is warped linearly and thresholded at 0.5 by the loss.
            targets = [np.concatenate([prepared["object_weights"][i][None].astype(np.float32), target])
                       for i, target in zip(indices, targets, strict=True)]
        crops, flows = transforms.random_rotate_and_resize(
            [prepared["data"][i].astype(np.float32) for i in indices], Y=targets,
            rescale=np.asarray(prepared["diams"])[indices] / params.diam_mean,
            scale_range=augmentation.scale_range, xy=(params.crop_size, params.crop_size),
        )[:2]
        crops = np.stack([augment_intensity(crop, rng, augmentation) for crop in crops])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, n_steps, params.learning_rate, warmup_steps)
        output = net(torch.from_numpy(crops).to(device))[0]
        if weighted:
            # Weights are >= 1 in the image; 0 is the warp's fill beyond it, background that weighs 1 as everywhere.
            pixel_weights = torch.from_numpy(np.where(flows[:, 0] > 0, flows[:, 0], 1.0)).to(device)
            loss = weighted_segmentation_loss(torch.from_numpy(flows[:, 1:]).to(device), output, pixel_weights)
        else:
            loss = train._loss_fn_seg(flows, output, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
        step += 1
        if step == n_steps or time.perf_counter() - last_save > checkpoint_seconds:
            save()
            last_save = time.perf_counter()
            log(f"step {step}/{n_steps} loss {np.mean(losses[-50:]):.4f} "
                f"{elapsed + last_save - start:.0f} s, checkpoint {checkpoint_path}")
    return LoopResult(
        model_path=model_path, steps=step, wall_seconds=elapsed + time.perf_counter() - start, losses=losses,
        diam_labels=float(net.diam_labels.item()), hardware=describe_hardware(), precision=precision,
    )


def average_precision(
    true_masks: list[np.ndarray],
    predicted_masks: list[np.ndarray],
    thresholds: tuple[float, ...] = AP_THRESHOLDS,
) -> dict[str, float]:
    """Average precision at IoU thresholds, as Cellpose reports it.

    AP = TP / (TP + FP + FN) per image, averaged over images, using
    ``cellpose.metrics.average_precision``.

    Returns
    -------
    dict
        ``{"ap50": ..., "ap75": ..., "ap90": ...}`` (keys from the thresholds).
    """
    import_cellpose()
    from cellpose import metrics

    ap, _, _, _ = metrics.average_precision(
        [m.astype(np.int32) for m in true_masks],
        [m.astype(np.int32) for m in predicted_masks],
        threshold=list(thresholds),
    )
    return {f"ap{round(t * 100)}": float(np.mean(ap[:, i])) for i, t in enumerate(thresholds)}


def small_object_recall(
    true_masks: list[np.ndarray],
    predicted_masks: list[np.ndarray],
    max_area: int = SMALL_OBJECT_AREA,
    iou_threshold: float = 0.5,
) -> tuple[float | None, int]:
    """Share of the small true objects that a predicted object matches.

    The measure of what AP hides on BBBC039: its micronuclei (objects under
    60 px, 6 % of the nuclei) decide whether AP@0.5 can pass 0.92.

    Parameters
    ----------
    true_masks, predicted_masks : list of ndarray
        Label images (0 = background), pairwise of one shape.
    max_area : int
        A true object is small when its area in pixels is below this.
    iou_threshold : float
        The IoU with one predicted object that counts as found.

    Returns
    -------
    (float or None, int)
        The recall (None without small objects) and the number of small objects.
    """
    found = total = 0
    for truth, predicted in zip(true_masks, predicted_masks, strict=True):
        t, p = truth.astype(np.int64).ravel(), predicted.astype(np.int64).ravel()
        n_true, n_predicted = int(t.max()) + 1, int(p.max()) + 1
        overlap = np.bincount(t * n_predicted + p, minlength=n_true * n_predicted).reshape(n_true, n_predicted)
        true_area, predicted_area = overlap.sum(1), overlap.sum(0)
        union = true_area[:, None] + predicted_area[None, :] - overlap
        iou = np.divide(overlap, union, out=np.zeros(overlap.shape), where=union > 0)[:, 1:]
        best = iou.max(1) if n_predicted > 1 else np.zeros(n_true)
        small = (true_area > 0) & (true_area < max_area)
        small[0] = False
        total += int(small.sum())
        found += int((best[small] >= iou_threshold).sum())
    return (found / total if total else None), total


def parse_named_path(text: str) -> tuple[str, Path]:
    """Split ``NAME=PATH`` (or a bare ``PATH``, named after its folder)."""
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text).name, Path(text)
    return name, Path(path)


def segment_annotated(segmenter, annotated: AnnotatedSet, *, annotated_diameters: bool) -> tuple[list, list]:
    """Segment every image of an annotated set.

    Returns
    -------
    (list of ndarray, list of float)
        The predicted masks, and each image's ``|estimated - annotated| / annotated`` median object diameter.
    """
    from cellpose.utils import diameters

    from mantle_assets.imaging.segmentation import SegmentationSettings

    predicted, errors = [], []
    for image, truth in zip(annotated.images, annotated.masks, strict=True):
        true_diameter = diameters(truth)[0]
        result = segmenter.segment(
            image, SegmentationSettings(diameter=true_diameter if annotated_diameters else None)
        )
        predicted.append(result.masks)
        errors.append(abs(result.diameter - true_diameter) / true_diameter)
    return predicted, errors


def score_predictions(true_masks: list[np.ndarray], predicted: list[np.ndarray], errors: list[float]) -> dict:
    """AP at :data:`AP_THRESHOLDS`, small-object recall and the median diameter error of segmented images."""
    scores = average_precision(true_masks, predicted)
    scores["small_object_recall"], scores["n_small_objects"] = small_object_recall(true_masks, predicted)
    scores["diameter_median_relative_error"] = float(np.median(errors))
    scores["n_images"] = len(true_masks)
    return scores


def evaluate_segmenter(segmenter, annotated: AnnotatedSet, *, annotated_diameters: bool = False) -> dict[str, float]:
    """Score a loaded model on an annotated set.

    Parameters
    ----------
    segmenter : CellposeSegmenter
        The model, loaded.
    annotated : AnnotatedSet
        Validation images and their true masks.
    annotated_diameters : bool
        Segment each image at its annotated median diameter instead of the
        automatic estimate (isolates the network from the size estimate).

    Returns
    -------
    dict
        ``ap50``/``ap75``/``ap90`` (mean over images),
        ``small_object_recall``/``n_small_objects`` (see
        :func:`small_object_recall`) and ``diameter_median_relative_error``: the median over images of
        ``|estimated - annotated| / annotated`` median object diameter.
    """
    predicted, errors = segment_annotated(segmenter, annotated, annotated_diameters=annotated_diameters)
    return score_predictions(annotated.masks, predicted, errors)


# The key of evaluate_styles' score of all held-out images together.
ALL_HELD_OUT = "held_out_styles"


def evaluate_styles(segmenter, held_out: dict[str, AnnotatedSet], *, annotated_diameters: bool = False) -> dict:
    """Score a loaded model on each held-out style, and on all of their images together.

    Parameters
    ----------
    segmenter : CellposeSegmenter
    held_out : dict of str to AnnotatedSet
        The held-out styles (see :func:`sets_by_style`).
    annotated_diameters : bool
        As for :func:`evaluate_segmenter`.

    Returns
    -------
    dict of str to dict
        :func:`evaluate_segmenter`'s scores per style, and under :data:`ALL_HELD_OUT` those of all
        held-out images (AP averaged over images, so larger styles weigh more).
    """
    scores, truths, predictions, errors = {}, [], [], []
    for name, annotated in held_out.items():
        predicted, error = segment_annotated(segmenter, annotated, annotated_diameters=annotated_diameters)
        scores[name] = score_predictions(annotated.masks, predicted, error)
        truths += annotated.masks
        predictions += predicted
        errors += error
    scores[ALL_HELD_OUT] = score_predictions(truths, predictions, errors)
    return scores

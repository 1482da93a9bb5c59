"""Acquisition styles of an annotated set, and a validation split that holds out whole styles.

A model scored on images of the microscopes it was trained on says little about
a lab's own plate. Clustering images by how they were acquired (image size,
intensity statistics, nucleus size) and holding out whole clusters measures
what it does on an unseen acquisition instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The features of an image's acquisition style, in the columns of style_features.
STYLE_FEATURES = (
    "log2_image_side",
    "foreground_intensity",
    "background_intensity",
    "nucleus_texture",
    "log2_nucleus_diameter",
    "foreground_fraction",
)


def style_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Describe how one annotated image was acquired.

    Parameters
    ----------
    image : ndarray
        ``(Y, X)`` raw intensities.
    mask : ndarray
        ``(Y, X)`` instance labels, 0 = background.

    Returns
    -------
    ndarray
        One value per :data:`STYLE_FEATURES`: log2 of the geometric mean image side; the median
        foreground and background intensity, as a share of the image's 99.9th percentile; the
        nuclei's texture (median over nuclei of their intensity's coefficient of variation);
        log2 of the median nucleus diameter (of a disc of the nucleus's area); the share of
        pixels inside nuclei.

    Raises
    ------
    ValueError
        If the shapes differ or the mask has no object or no background.
    """
    if image.shape != mask.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be one (Y, X) shape")
    labels = mask.astype(np.int64).ravel()
    values = image.astype(np.float64).ravel()
    inside = labels > 0
    if not inside.any() or inside.all():
        raise ValueError("mask must hold objects and background")
    scale = max(float(np.percentile(values, 99.9)), 1e-12)
    areas = np.bincount(labels)
    sums = np.bincount(labels, values)
    squares = np.bincount(labels, values**2)
    present = np.flatnonzero(areas[1:]) + 1
    means = sums[present] / areas[present]
    stds = np.sqrt(np.maximum(squares[present] / areas[present] - means**2, 0.0))
    texture = np.median(stds / np.maximum(means, 1e-12))
    diameter = np.median(2.0 * np.sqrt(areas[present] / np.pi))
    return np.array(
        [
            0.5 * np.log2(image.shape[0] * image.shape[1]),
            np.median(values[inside]) / scale,
            np.median(values[~inside]) / scale,
            texture,
            np.log2(diameter),
            inside.mean(),
        ]
    )


@dataclass(frozen=True)
class StyleClusters:
    """Images grouped by acquisition style.

    Attributes
    ----------
    labels : ndarray
        Style of each image, 0..k-1, numbered by ascending median nucleus diameter.
    centres : ndarray
        ``(k, len(STYLE_FEATURES))`` mean features of each style, unstandardised.
    """

    labels: np.ndarray
    centres: np.ndarray

    def describe(self, style: int) -> str:
        """One line: the style's number of images, image side and nucleus diameter."""
        centre = dict(zip(STYLE_FEATURES, self.centres[style], strict=True))
        count = int((self.labels == style).sum())
        return (
            f"style {style}: {count} images, side ~{2 ** centre['log2_image_side']:.0f} px, "
            f"nuclei ~{2 ** centre['log2_nucleus_diameter']:.0f} px, foreground {centre['foreground_fraction']:.0%}"
        )


def cluster_styles(features: np.ndarray, n_styles: int, *, seed: int = 0) -> StyleClusters:
    """Cluster images by acquisition style: k-means on standardised :func:`style_features`.

    Deterministic for a seed (``scipy.cluster.vq.kmeans2`` with k-means++ seeding from
    ``numpy.random.default_rng(seed)``); the styles are then numbered by their mean log
    nucleus diameter, so the numbering does not depend on k-means' order.

    Parameters
    ----------
    features : ndarray
        ``(n_images, n_features)``, one row per image.
    n_styles : int
        Number of styles, 2 to n_images.
    seed : int
        Seed of the k-means initialisation.

    Returns
    -------
    StyleClusters

    Raises
    ------
    ValueError
        If ``n_styles`` is out of range or a style comes out empty.
    """
    from scipy.cluster.vq import kmeans2

    features = np.asarray(features, dtype=np.float64)
    if not 2 <= n_styles <= len(features):
        raise ValueError(f"n_styles must be 2 to {len(features)} (the number of images), got {n_styles}")
    spread = features.std(0)
    standardised = (features - features.mean(0)) / np.where(spread > 0, spread, 1.0)
    _, labels = kmeans2(standardised, n_styles, minit="++", seed=np.random.default_rng(seed))
    if len(np.unique(labels)) != n_styles:
        raise ValueError(f"k-means found only {len(np.unique(labels))} of n_styles={n_styles} styles: use fewer")
    centres = np.stack([features[labels == k].mean(0) for k in range(n_styles)])
    diameter = STYLE_FEATURES.index("log2_nucleus_diameter")
    order = np.argsort(centres[:, diameter], kind="stable")
    renumber = np.empty(n_styles, dtype=np.int64)
    renumber[order] = np.arange(n_styles)
    return StyleClusters(renumber[labels], centres[order])


def held_out_styles(labels: np.ndarray, max_share: float) -> list[int]:
    """The styles held out of training: the smallest and the largest nuclei first, inwards.

    Styles are taken alternately from the two ends of the nucleus-diameter order
    (style 0, style k-1, style 1, ...) while the held-out images stay within
    ``max_share`` of all images, and at least one style stays for training. The ends
    are the acquisitions least like the rest: what a model meets on another lab's plate.

    Parameters
    ----------
    labels : ndarray
        Style of each image (as :attr:`StyleClusters.labels`).
    max_share : float
        Most share of the images held out, in (0, 1).

    Returns
    -------
    list of int
        Held-out styles, sorted.

    Raises
    ------
    ValueError
        If ``max_share`` is out of range or not even one style fits in it.
    """
    if not 0 < max_share < 1:
        raise ValueError(f"max_share must be in (0, 1), got {max_share}")
    counts = np.bincount(labels)
    n_styles = len(counts)
    ends = [s for pair in zip(range(n_styles), range(n_styles - 1, -1, -1), strict=True) for s in pair]
    held, total = [], 0
    for style in dict.fromkeys(ends):
        if len(held) + 1 == n_styles:
            break
        if total + counts[style] <= max_share * len(labels):
            held.append(style)
            total += counts[style]
    if not held:
        raise ValueError(f"no style is small enough to hold out within max_share={max_share}")
    return sorted(held)


def split_by_style(labels: np.ndarray, held_out: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training images and of the held-out images (whole styles, never trained on)."""
    held = np.isin(labels, held_out)
    return np.flatnonzero(~held), np.flatnonzero(held)


# The leave-styles-out validation of dsb2018_fluo (issue 19): six styles, up to 30 % of the images held out.
N_STYLES = 6
MAX_HELD_OUT_SHARE = 0.3


@dataclass(frozen=True)
class StyleSplit:
    """An annotated set split by acquisition style: styles to train on and styles held out."""

    clusters: StyleClusters
    held_out: list[int]
    train: np.ndarray
    validation: np.ndarray


def split_annotated_by_style(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    *,
    n_styles: int = N_STYLES,
    max_share: float = MAX_HELD_OUT_SHARE,
    seed: int = 0,
) -> StyleSplit:
    """Cluster annotated images by style (:func:`cluster_styles`) and hold out whole styles (:func:`held_out_styles`).

    Returns
    -------
    StyleSplit
        Image indices to train on and to validate on; ``clusters.labels`` gives each image's style.
    """
    features = np.stack([style_features(image, mask) for image, mask in zip(images, masks, strict=True)])
    clusters = cluster_styles(features, n_styles, seed=seed)
    held = held_out_styles(clusters.labels, max_share)
    train, validation = split_by_style(clusters.labels, held)
    return StyleSplit(clusters, held, train, validation)

"""Where Cellpose weights come from: built-in names, Cellpose's cache, bundled models, files.

Cellpose 3 silently falls back to ``cyto3`` for a name it does not know and
downloads built-in weights on first use. Here a model name is resolved up
front to a weights file, so an unknown name or an unreachable download fails
before any work starts, with a message that says what is usable offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mantle_assets.imaging.segmentation import ParameterError
from mantle_assets.models.cellpose_import import import_cellpose
from mantle_assets.settings import OutsideDataRootsError, check_data_path, mantle_home

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_METADATA = "model.json"
# The model.json key of a network trained on one nuclear channel alone (Cellpose ``channels=[c, 0]``).
ONE_NUCLEAR_CHANNEL = "one_nuclear_channel"
# Cellpose's built-ins trained that way; the others take a cytoplasm and a nuclear channel.
ONE_NUCLEAR_CHANNEL_BUILTINS = frozenset({"nuclei"})
# A Cellpose 3 network's weights take 26 MB in float32; a file (or zip member total) ten times that is not one,
# and is not read to find out.
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
# torch.save's zip archive (PyTorch >= 1.6) and its older format, a pickle of protocol 2.
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80\x02")
# Tensors every Cellpose 3 network (cellpose.resnet_torch.CPnet) has: its first convolution and its output.
CELLPOSE_WEIGHT_KEYS = ("downsample.down.res_down_0.conv.conv_0.0.weight", "output.2.weight")


class ModelResolutionError(ValueError):
    """A model that cannot be used; the message names it and the offline alternatives."""


@dataclass(frozen=True)
class ModelSpec:
    """A Cellpose model the platform can run.

    Attributes
    ----------
    name : str
        Built-in or bundled name, or the weights file path.
    kind : {"builtin", "bundled", "file"}
    path : Path
        Where the weights are (or will be, once a built-in is downloaded).
    offline : bool
        Whether the weights are on disk, so no download is needed.
    diam_mean : float or None
        Object diameter the network works at, when known without loading it.
    one_nuclear_channel : bool
        Whether the network was trained on one nuclear channel alone, so that it segments nuclei
        only; False where that is not known (model files).
    """

    name: str
    kind: str
    path: Path
    offline: bool
    diam_mean: float | None = None
    one_nuclear_channel: bool = False

    def check_channels(self, nuclei_channel: int, cytoplasm_channel: int) -> None:
        """Refuse a whole-cell request (``cytoplasm_channel`` != ``nuclei_channel``) to a nuclei-only model.

        Given a second channel, a network trained on one nuclear channel finds nothing or
        nonsense, with no error of its own.

        Raises
        ------
        ParameterError
            One line naming the model and the channels and saying what to do instead.
        """
        if self.one_nuclear_channel and cytoplasm_channel != nuclei_channel:
            nuclear = nuclei_channel or cytoplasm_channel
            raise ParameterError(
                f"cellpose_model '{self.name}' segments nuclei in one channel, but cytoplasm_channel="
                f"{cytoplasm_channel} differs from nuclei_channel={nuclei_channel} (a whole-cell request): to "
                f"segment nuclei set cytoplasm_channel equal to nuclei_channel (both {nuclear}); for whole cells "
                "use a whole-cell model such as cyto3 or a model file"
            )

    def weights_sha256(self) -> str:
        """Content hash of the weights: a changed model file makes earlier masks stale."""
        digest = hashlib.sha256()
        with self.path.open("rb") as weights:
            while block := weights.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "path": str(self.path),
            "offline": self.offline,
            "diam_mean": self.diam_mean,
            "one_nuclear_channel": self.one_nuclear_channel,
        }


def cellpose_model_dir() -> Path:
    """Cellpose's weights cache (``CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``)."""
    import_cellpose()
    from cellpose import models

    return Path(models.MODEL_DIR)


def builtin_model_names() -> list[str]:
    """Cellpose's built-in models for the standard network, in Cellpose's order.

    The transformer models need ``backbone="transformer"`` (and the
    segmentation_models_pytorch package), so they are not offered.
    """
    import_cellpose()
    from cellpose import models

    return [name for name in dict.fromkeys(models.MODEL_NAMES) if "transformer" not in name]


def _builtin_basename(name: str) -> str:
    # Cellpose's file naming (cellpose.models.model_path), computed here because
    # calling model_path itself starts a download when the file is missing.
    return f"{name}torch_0" if name in ("cyto", "cyto2", "nuclei") else name


def builtin_spec(name: str) -> ModelSpec:
    path = cellpose_model_dir() / _builtin_basename(name)
    return ModelSpec(
        name, "builtin", path, path.is_file(), 17.0 if name == "nuclei" else 30.0,
        one_nuclear_channel=name in ONE_NUCLEAR_CHANNEL_BUILTINS,
    )


def bundled_specs() -> list[ModelSpec]:
    """Models shipped inside this package, each a folder with weights and ``model.json``."""
    specs = []
    if BUNDLED_DIR.is_dir():
        for folder in sorted(BUNDLED_DIR.iterdir()):
            metadata_file = folder / BUNDLED_METADATA
            if metadata_file.is_file():
                metadata = json.loads(metadata_file.read_text())
                path = folder / metadata["weights"]
                specs.append(
                    ModelSpec(
                        folder.name, "bundled", path, path.is_file(), metadata["diam_mean"],
                        one_nuclear_channel=metadata.get(ONE_NUCLEAR_CHANNEL, False),
                    )
                )
    return specs


def available_models() -> list[ModelSpec]:
    """Every model known by name: bundled ones first, then Cellpose's built-ins."""
    return bundled_specs() + [builtin_spec(name) for name in builtin_model_names()]


def offline_model_names() -> list[str]:
    return [spec.name for spec in available_models() if spec.offline]


def resolve_model(name_or_path: str, *, download: bool = True) -> ModelSpec:
    """Find the weights of a model given by name or path.

    Parameters
    ----------
    name_or_path : str
        A bundled model name, a Cellpose built-in name, or a path to a
        Cellpose model file.
    download : bool
        Whether a built-in model missing from Cellpose's cache may be
        downloaded (Cellpose's own download, into its cache).

    Returns
    -------
    ModelSpec
        With ``offline=True``: the weights file exists.

    Raises
    ------
    ModelResolutionError
        For an unknown name, built-in weights neither cached nor downloadable, or a
        file refused by :func:`check_model_file`.
    """
    name = name_or_path.strip()
    for spec in bundled_specs():
        if spec.name == name:
            return spec
    if name in builtin_model_names():
        spec = builtin_spec(name)
        if spec.offline:
            return spec
        if download:
            return _download_builtin(spec)
        raise ModelResolutionError(
            f"cellpose_model '{name}' is not in Cellpose's cache ({spec.path.parent}); "
            f"models available offline: {', '.join(offline_model_names()) or 'none'}"
        )
    path = Path(os.path.expanduser(name))
    if path.is_file():
        path = check_model_file(path)
        return ModelSpec(str(path), "file", path, True)
    raise ModelResolutionError(
        f"unknown cellpose_model '{name}': use a bundled model "
        f"({', '.join(s.name for s in bundled_specs()) or 'none'}), a Cellpose built-in "
        f"({', '.join(builtin_model_names())}) or the path of a model file"
    )


def names_a_file(cellpose_model: str | None) -> bool:
    """Whether a ``cellpose_model`` value can only be a file: model names hold no ``/`` and start with no ``~``."""
    return cellpose_model is not None and ("/" in cellpose_model or cellpose_model.startswith("~"))


def platform_model_directories() -> list[Path]:
    """Where the platform's own weights lie: bundled models, Cellpose's cache, models trained here."""
    return [BUNDLED_DIR.resolve(), cellpose_model_dir().resolve(), (mantle_home() / "models").resolve()]


def check_model_file(path: str | os.PathLike) -> Path:
    """Refuse a model file outside the data roots, or one that holds no Cellpose weights.

    A model file is confined like registered paths (see
    :func:`~mantle_assets.settings.check_data_path`: symbolic links and ``..``
    resolved), except in :func:`platform_model_directories`. Its content is
    checked before anything else reads it (see :func:`check_cellpose_weights`).

    Parameters
    ----------
    path : path
        The ``cellpose_model`` file, as given (``~`` expanded, relative to the working directory).

    Returns
    -------
    Path
        The resolved path.

    Raises
    ------
    ModelResolutionError
        One line naming the file.
    """
    resolved = Path(path).expanduser().resolve()
    try:
        check_data_path(resolved, "cellpose_model")
    except OutsideDataRootsError as error:
        # Asked for only now: listing Cellpose's cache imports Cellpose.
        if not any(resolved.is_relative_to(folder) for folder in platform_model_directories()):
            raise ModelResolutionError(str(error)) from None
    check_cellpose_weights(resolved)
    return resolved


def check_cellpose_weights(path: Path) -> None:
    """Refuse a file that is not a Cellpose 3 network's weights, without echoing what it holds.

    Any file may be given as a model: its size is checked (and a zip archive's
    unpacked size) against ``MAX_WEIGHTS_BYTES``, its first bytes against
    torch's two file formats, and only then is it loaded, with
    ``torch.load(weights_only=True)`` (which unpickles tensors and containers
    only), to find the tensors of a Cellpose 3 network in it. The file is read
    whole, as Cellpose reads it next.

    Raises
    ------
    ModelResolutionError
        One line naming the file and what is wrong; torch's own messages are
        left out, since they may quote the file's bytes.
    """
    import torch

    def refused(reason: str) -> ModelResolutionError:
        return ModelResolutionError(f"cellpose_model {path} is not a Cellpose model file: {reason}")

    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            magic = stream.read(4)
        if size > MAX_WEIGHTS_BYTES:
            raise refused(f"{size} bytes, more than MAX_WEIGHTS_BYTES ({MAX_WEIGHTS_BYTES})")
        if not magic.startswith(TORCH_FILE_MAGIC):
            raise refused("not a PyTorch file")
        if magic == TORCH_FILE_MAGIC[0]:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(member.file_size for member in archive.infolist())
            if unpacked > MAX_WEIGHTS_BYTES:
                raise refused(f"unpacks to {unpacked} bytes, more than MAX_WEIGHTS_BYTES ({MAX_WEIGHTS_BYTES})")
    except OSError as error:
        raise refused(error.strerror or type(error).__name__) from None
    except zipfile.BadZipFile:
        raise refused("a damaged zip archive") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling, zip and torch errors alike
        raise refused(f"torch.load(weights_only=True) failed ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(key), torch.Tensor) for key in CELLPOSE_WEIGHT_KEYS):
        raise refused("no Cellpose 3 network in it")


def _download_builtin(spec: ModelSpec) -> ModelSpec:
    import_cellpose()
    from cellpose import models

    try:
        models.cache_model_path(spec.path.name)
    except Exception as error:  # noqa: BLE001 - urllib, socket and HTTP errors alike
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelResolutionError(
            f"cellpose_model '{spec.name}' is not in Cellpose's cache ({spec.path.parent}) "
            f"and could not be downloaded ({reason}); models available offline: "
            f"{', '.join(offline_model_names()) or 'none'}"
        ) from None
    return builtin_spec(spec.name)

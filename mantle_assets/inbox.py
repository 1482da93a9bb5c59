"""An inbox folder: sub-folders copied into it become image directories once they stop changing."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mantle_assets.models.registry import check_model_file, names_a_file
from mantle_assets.orchestration.config import SegmentationConfig, coerce_segmentation_parameters
from mantle_assets.settings import check_data_path

SIDECAR_NAMES = ("experiment.yaml", "experiment.yml", "experiment.json")
# What a sidecar may set; anything else is refused rather than ignored, so that a misspelt key is noticed.
SIDECAR_KEYS = ("experiment_name", "segmentation_defaults", "channel_names", "plate_layout", "naming_pattern")

# A sidecar holds a few settings; a larger file is refused unread, so that the sensor never parses megabytes.
MAX_SIDECAR_BYTES = 64 * 1024


class _SidecarLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases.

    An alias (``*name``) repeats the node its anchor names: nine nested lines of
    aliases ("billion laughs") expand to 10**9 strings, which took the code
    server to 17 GB in 20 s. Sidecars have no use for them.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            raise yaml.YAMLError(f"YAML aliases (*name) are not allowed (line {line})")
        return super().compose_node(parent, index)


@dataclass(frozen=True)
class InboxFolder:
    path: Path
    last_change: float
    signature: str


def inbox_folders(inbox: Path) -> list[Path]:
    """The inbox's visible sub-folders, by name: each is one image directory, however deep its files lie."""
    return sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(path: Path) -> InboxFolder:
    """An inbox folder's last change time and content signature, over its sub-folders too.

    The signature hashes every visible file's path (relative to the folder), size
    and modification time, so a folder still being copied into, at any depth (a
    MetaXpress ``TimePoint_1/``, one sub-folder per well), shows a different
    signature at each scan. Hidden folders (``.snapshot``, ``.git``) are not
    entered. Hidden files do not enter the signature (a Finder ``.DS_Store``
    does not make a refused folder be tried again), but their times do count as
    changes: rsync and many copy tools write each file as a hidden temporary file
    first, and the folder is not settled until it is renamed.
    """
    digest = hashlib.sha256()
    last_change = path.stat().st_mtime
    for root, folders, files in os.walk(path):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name, is_file in [*((name, False) for name in folders), *((name, True) for name in sorted(files))]:
            item = Path(root, name)
            try:
                stat = item.stat()
            except FileNotFoundError:
                if not item.is_symlink():  # renamed or removed since it was listed: a change, now
                    last_change = time.time()
                    continue
                stat = item.lstat()  # a dangling link counts as itself, or the folder would never settle
            last_change = max(last_change, stat.st_mtime)
            if is_file and not name.startswith("."):
                digest.update(f"{item.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return InboxFolder(path, last_change, digest.hexdigest())


def read_sidecar(folder: Path) -> dict:
    """The folder's ``experiment.yaml``/``.yml``/``.json``, checked (empty when absent).

    ``segmentation_defaults`` are read as ``mantle defaults`` reads its options
    (:func:`~mantle_assets.orchestration.config.coerce_segmentation_parameters`):
    ``diameter: 12`` is 12 pixels, ``diameter: null`` or ``None`` estimates it,
    ``nuclei_channel: "2"`` is channel 2, ``nuclei_channel: DNA`` the channel
    named so (by ``channel_names`` or the file names), resolved at registration.

    Returns
    -------
    dict
        ``experiment_name`` (text), ``segmentation_defaults`` (typed parameters), ``channel_names`` (list of
        text), ``plate_layout`` (a path; relative ones are below the folder) and ``naming_pattern`` (text),
        where the sidecar sets them: what ``mantle register`` takes as options.

    Raises
    ------
    ValueError
        One line naming the file, and the key and value where one is wrong: a
        sidecar that is a symbolic link out of the data roots (see
        :func:`~mantle_assets.settings.check_data_path`) or larger than
        ``MAX_SIDECAR_BYTES``, not a mapping of valid YAML/JSON, YAML with
        aliases, nesting too deep to parse, an unknown key, an experiment name
        that is no text, segmentation defaults that are no mapping or hold an
        unknown parameter or a bad value, a ``cellpose_model`` file outside the
        data roots or holding no Cellpose weights (see
        :func:`~mantle_assets.models.registry.check_model_file`).
    """
    for name in SIDECAR_NAMES:
        sidecar = folder / name
        if sidecar.is_file():
            try:
                check_data_path(sidecar, "sidecar")
            except ValueError as error:
                raise ValueError(f"{sidecar}: {error}") from None
            with sidecar.open("rb") as stream:
                data = stream.read(MAX_SIDECAR_BYTES + 1)
            if len(data) > MAX_SIDECAR_BYTES:
                raise ValueError(f"{sidecar}: larger than {MAX_SIDECAR_BYTES} bytes, the most a sidecar may hold")
            try:
                text = data.decode()
                content = json.loads(text) if name.endswith(".json") else yaml.load(text, Loader=_SidecarLoader)
            except (ValueError, yaml.YAMLError) as error:
                raise ValueError(f"{sidecar}: not valid {name.rsplit('.', 1)[1].upper()}: "
                                 f"{str(error).splitlines()[0]}") from None
            except RecursionError:  # [[[[...: both parsers recurse once per level
                raise ValueError(f"{sidecar}: not valid {name.rsplit('.', 1)[1].upper()}: nested too deeply") from None
            if not isinstance(content, dict):
                raise ValueError(f"{sidecar}: expected a mapping of settings")
            return _checked_sidecar(sidecar, content)
    return {}


def _checked_sidecar(sidecar: Path, content: dict) -> dict:
    unknown = [key for key in content if key not in SIDECAR_KEYS]
    if unknown:
        raise ValueError(f"{sidecar}: unknown key {unknown[0]!r} (known: {', '.join(SIDECAR_KEYS)})")
    checked = {}
    experiment = content.get("experiment_name")
    if experiment is not None:
        # YAML reads `experiment_name: 2024-05-01` as a date and `experiment_name: 42` as a number; both name it.
        if isinstance(experiment, bool) or not isinstance(experiment, (str, int, float, datetime.date)):
            raise ValueError(f"{sidecar}: experiment_name must be text, got {experiment!r}")
        checked["experiment_name"] = str(experiment)
    defaults = content.get("segmentation_defaults")
    if defaults is not None:
        where = f"{sidecar}: segmentation_defaults"
        if not isinstance(defaults, dict):
            raise ValueError(f"{where} must be a mapping of parameters, got {defaults!r}")
        defaults = coerce_segmentation_parameters(defaults, where)
        # Channels given by name are checked at registration, against the plate's channels.
        numbers = {key: value for key, value in defaults.items() if not isinstance(value, str) or "channel" not in key}
        try:
            SegmentationConfig(**numbers).settings()
        except ValueError as error:
            raise ValueError(f"{where}: {str(error).splitlines()[0]}") from None
        # Model names are checked when a run resolves them (listing Cellpose's takes importing it); files now.
        if names_a_file(defaults.get("cellpose_model")):
            try:
                check_model_file(defaults["cellpose_model"])
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        checked["segmentation_defaults"] = defaults
    names = content.get("channel_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"{sidecar}: channel_names must be a list of names, got {names!r}")
        checked["channel_names"] = names
    for key in ("plate_layout", "naming_pattern"):
        value = content.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{sidecar}: {key} must be text, got {value!r}")
    if content.get("plate_layout") is not None:
        checked["plate_layout"] = str(sidecar.parent / content["plate_layout"])
    if content.get("naming_pattern") is not None:
        checked["naming_pattern"] = content["naming_pattern"]
    return checked

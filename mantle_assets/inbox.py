"""An inbox folder: sub-folders copied into it become image directories once they stop changing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

SIDECAR_NAMES = ("experiment.yaml", "experiment.yml", "experiment.json")


@dataclass(frozen=True)
class InboxFolder:
    path: Path
    last_change: float
    signature: str


def scan_inbox(inbox: Path) -> list[InboxFolder]:
    """The inbox's visible sub-folders with their last change time and a content signature.

    The signature hashes every file's name, size and modification time, so a
    folder still being copied into shows a different signature at each scan.
    """
    folders = []
    for path in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        digest = hashlib.sha256()
        last_change = path.stat().st_mtime
        for item in sorted(path.iterdir()):
            stat = item.stat()
            last_change = max(last_change, stat.st_mtime)
            digest.update(f"{item.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        folders.append(InboxFolder(path, last_change, digest.hexdigest()))
    return folders


def read_sidecar(folder: Path) -> dict:
    """The folder's ``experiment.yaml``/``.yml``/``.json`` as a dict (empty when absent).

    Raises
    ------
    ValueError
        One line naming the file when it is not a mapping of valid YAML/JSON.
    """
    for name in SIDECAR_NAMES:
        sidecar = folder / name
        if sidecar.is_file():
            try:
                text = sidecar.read_text()
                content = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
            except (ValueError, yaml.YAMLError) as error:
                raise ValueError(f"{sidecar}: not valid {name.rsplit('.', 1)[1].upper()}: "
                                 f"{str(error).splitlines()[0]}") from None
            if not isinstance(content, dict):
                raise ValueError(f"{sidecar}: expected a mapping of settings")
            return content
    return {}

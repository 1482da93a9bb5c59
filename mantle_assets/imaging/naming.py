"""How instruments name their image files: naming schemes as data, and parsing names with them.

A naming scheme is a regular expression over a file's name (without its image
suffix and ``.ome``) whose named groups say what the name holds, the way
CellProfiler's metadata extraction works:

* ``channel``: the channel token as written (``w1``, ``ch2``, ``d0``, ``C01``,
  ``DAPI``); the channels of a field are ordered naturally by it, and channel
  c (1-based) of a field is the c-th;
* ``well``, or ``row`` and ``column`` (letters or numbers): the plate well;
* ``field``: the field (site) within the well;
* ``plane`` and ``timepoint``: the z-plane and time point.

Any other group whose name starts with ``channel`` (``channel_part``) marks text
that belongs to the channel too (a separator, an acquisition index, a GUID).
The *field name*, which names the field's masks, is the file name with the
channel, plane and time point text cut out: ``r01c01f01p01-ch1sk1fk1fl1`` is
field ``r01c01f01`` of channel ``ch1`` at plane ``p01``.

A pattern that holds ``/`` is matched against the path below the image
directory (``A01/img_1``); otherwise against the file name, and the folders
above the file prefix the field name, except MetaXpress's ``TimePoint_<n>`` and
``ZStep_<n>`` folders, which give the time point and plane.

:data:`SCHEMES` are tried in order; adding an instrument is one entry (and a
test) there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "GROUPS",
    "ONE_FILE_PER_FIELD",
    "SCHEMES",
    "USER_PATTERN",
    "NamingError",
    "NamingScheme",
    "ParsedName",
    "channel_like_pair",
    "natural_key",
    "parse_name",
    "user_scheme",
    "well_of",
]

GROUPS = ("well", "row", "column", "field", "channel", "plane", "timepoint")
ONE_FILE_PER_FIELD = "one-file-per-field"
USER_PATTERN = "pattern"

_UUID = r"[0-9A-F]{8}(?:-[0-9A-F]{4}){3}-[0-9A-F]{12}"
_WELL_TEXT = r"(?:A[A-F]|[A-P])\d{2}"  # 96, 384 and 1536 (AA-AF) plates, two-digit columns


class NamingError(ValueError):
    """A naming pattern that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class NamingScheme:
    """How one instrument (or a user) names image files.

    Attributes
    ----------
    name : str
        Short name shown to users (``operetta``).
    regex : str
        Matched against the whole file name (or relative path, if it holds
        ``/``), case-insensitively; named groups as in the module notes.
    example : str
        A file name the scheme reads (the tests parse every example).
    description : str
        The instrument or software that writes such names.
    ignore : str, optional
        Files whose name matches this (searched, case-insensitively) are not
        images of the plate, e.g. MetaXpress's ``_thumb`` previews.
    min_channels : int
        The scheme is chosen only when the names give at least this many
        channels; the generic suffix schemes need two, so that ``img_c1.tif``
        alone stays a field named ``img_c1``.
    """

    name: str
    regex: str
    example: str
    description: str
    ignore: str | None = None
    min_channels: int = 1

    @property
    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.regex, re.IGNORECASE)

    @property
    def matches_path(self) -> bool:
        """Whether the regex reads the folders too (it holds ``/``)."""
        return "/" in self.regex

    def ignores(self, name: str) -> bool:
        return self.ignore is not None and re.search(self.ignore, name, re.IGNORECASE) is not None


SCHEMES: tuple[NamingScheme, ...] = (
    NamingScheme(
        "bbbc014",
        r"(?P<channel_part>(?P<channel>Channel\d+)-)\d+-(?P<row>[A-P])-(?P<column>\d{2})",
        "Channel2-01-A-01",
        "BBBC014 / CellProfiler's ExampleSBSImages: ChannelN-<image>-<row>-<column>",
    ),
    NamingScheme(
        "imagexpress",
        rf"(?:.+_)?(?P<timepoint>t\d+)_(?P<well>{_WELL_TEXT})(?:_(?P<field>s\d+))?"
        rf"(?P<channel_part>_(?P<channel>w\d+))?(?:_(?P<plane>z\d+))?(?P<channel_id>{_UUID})?",
        "plate1_t1_A01_s1_w1_z1",
        "ImageXpress (newer MetaXpress exports): <plate>_t<t>_<well>_s<site>_w<ch>_z<z>",
        ignore=r"_thumb",
    ),
    NamingScheme(
        "metaxpress",
        # The GUID follows the wavelength directly; its fixed length tells "w1" + "051DAA7C-..." from "w10" + ...
        rf"(?:.+_)?(?P<well>{_WELL_TEXT})(?:_(?P<field>s\d+))?(?P<channel_part>_(?P<channel>w\d+)(?:{_UUID})?)?",
        "IXMtest_A02_s1_w1051DAA7C-7042-435F-99F0-1E4AD1E4C1AB",
        "MetaXpress / ImageXpress: <plate>_<well>_s<site>_w<ch>[GUID], TimePoint_<n>/ZStep_<n> folders",
        ignore=r"_thumb",
    ),
    NamingScheme(
        "operetta",
        r"r(?P<row>\d{2})c(?P<column>\d{2})(?P<field>f\d+)(?P<plane>p\d+)"
        r"(?P<channel_part>-(?P<channel>ch\d+)(?P<timepoint>sk\d+)?(?:fk\d+fl\d+)?)",
        "r01c01f01p01-ch1sk1fk1fl1",
        "Operetta / Opera Phenix (Harmony): r<row>c<col>f<field>p<plane>-ch<ch>sk<t>fk1fl1",
    ),
    NamingScheme(
        "yokogawa",
        rf"(?:.+_)?(?P<well>{_WELL_TEXT})_(?P<timepoint>T\d{{4}})(?P<field>F\d{{3}})L\d{{2}}"
        r"(?P<channel_action>A\d{2})(?P<plane>Z\d{2})(?P<channel>C\d{2})",
        "plate1_A01_T0001F001L01A01Z01C01",
        "Yokogawa CellVoyager CV7000/CV8000: <plate>_<well>_T<t>F<field>L<line>A<action>Z<z>C<ch>",
    ),
    NamingScheme(
        "cellomics",
        rf"(?:.+_)?(?P<well>{_WELL_TEXT})(?P<field>f\d{{2}})(?P<channel>d\d)",
        "MFGTMP_150303150001_A01f00d0",
        "Cellomics / CellInsight (HCS Studio): <plate>_<well>f<field>d<ch>, d0 = channel 1",
    ),
    NamingScheme(
        "incell",
        r"(?P<row>[A-P]{1,2}) - (?P<column>\d{1,2})\((?:fld (?P<field>\d+))?"
        r"(?P<channel_part> ?wv (?P<channel>[^()]+?))?"
        r"(?P<plane> z \d+)?(?P<timepoint> time \d+[^()]*)?\)",
        "B - 03(fld 1 wv DAPI - DAPI)",
        "IN Cell Analyzer: <row> - <col>(fld <n> wv <excitation> - <emission>[ z <n>][ time <n> - <ms> ms])",
    ),
    # The generic per-channel suffixes of earlier releases; needing two channels keeps lone
    # "img_c1.tif" files fields of their own.
    NamingScheme(
        "channel-prefix", r"(?P<channel_part>(?P<channel>channel\d+)[-_]).+", "Channel1_img7",
        "one file per channel, channel first", min_channels=2,
    ),
    NamingScheme(
        "w-suffix", rf".+(?P<channel_part>_(?P<channel>w\d+)(?:{_UUID})?)", "img7_w2",
        "one file per channel, _w<n> last", ignore=r"_thumb", min_channels=2,
    ),
    NamingScheme(
        "ch-suffix", r".+(?P<channel_part>_(?P<channel>ch\d+))", "pos01_ch00", "Leica: _ch<n> last", min_channels=2,
    ),
    NamingScheme(
        "c-suffix", r".+(?P<channel_part>_(?P<channel>c\d+))", "img_c1", "one file per channel, _c<n> last",
        min_channels=2,
    ),
)


def user_scheme(pattern: str) -> NamingScheme:
    """A naming scheme from a user's regular expression.

    Parameters
    ----------
    pattern : str
        A regular expression with named groups among :data:`GROUPS` (and
        ``channel_*``), matched against the whole file name or, when it holds
        ``/``, the path below the image directory.

    Returns
    -------
    NamingScheme
        Named ``"pattern"``.

    Raises
    ------
    NamingError
        If the pattern does not compile, names no known group, or names an
        unknown one.

    Examples
    --------
    >>> user_scheme(r"(?P<well>[A-H]\\d\\d)_(?P<channel>DAPI|GFP)").name
    'pattern'
    """
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise NamingError(f"naming pattern {pattern!r} is not a regular expression: {error}") from None
    names = set(compiled.groupindex)
    unknown = sorted(name for name in names if name not in GROUPS and not name.startswith("channel_"))
    if unknown:
        raise NamingError(
            f"naming pattern {pattern!r}: unknown group {unknown[0]!r}; use {', '.join(GROUPS)} (or channel_<any>)"
        )
    if not names:
        raise NamingError(f"naming pattern {pattern!r} has no named group; name them, e.g. (?P<channel>w\\d)")
    return NamingScheme(USER_PATTERN, pattern, "", "given at registration")


@dataclass(frozen=True)
class ParsedName:
    """What one image file's name says.

    Attributes
    ----------
    field : str
        The field name: the name with channel, plane and time point cut out,
        folders prefixed with ``_``.
    channel, well, site, plane, timepoint : str or None
        As written in the name (``well`` normalised to ``A01``); None where
        the name does not say.
    """

    field: str
    channel: str | None = None
    well: str | None = None
    site: str | None = None
    plane: str | None = None
    timepoint: str | None = None


_FOLDER_TOKENS = {"timepoint": re.compile(r"TimePoint_\d+", re.IGNORECASE), "plane": re.compile(r"ZStep_\d+", re.I)}
_CUT = ("plane", "timepoint")


def parse_name(scheme: NamingScheme, relative: PurePosixPath) -> ParsedName | None:
    """Parse a file's path below its image directory with a scheme.

    Parameters
    ----------
    scheme : NamingScheme
    relative : PurePosixPath
        E.g. ``TimePoint_1/plate_A01_s1_w1.tif``.

    Returns
    -------
    ParsedName or None
        None when the name does not match the scheme.

    Raises
    ------
    NamingError
        If the scheme matches but cutting leaves no field name.

    Examples
    --------
    >>> operetta = next(s for s in SCHEMES if s.name == "operetta")
    >>> parsed = parse_name(operetta, PurePosixPath("r02c03f01p01-ch1sk1fk1fl1.tiff"))
    >>> parsed.field, parsed.channel, parsed.well, parsed.site, parsed.plane
    ('r02c03f01', 'ch1', 'B03', 'f01', 'p01')
    """
    stem = file_stem(relative.name)
    folders = list(relative.parts[:-1])
    found: dict[str, str | None] = {"plane": None, "timepoint": None}
    if scheme.matches_path:
        subject, prefix = "/".join([*folders, stem]), []
    else:
        subject, prefix = stem, []
        for folder in folders:
            kind = next((kind for kind, token in _FOLDER_TOKENS.items() if token.fullmatch(folder)), None)
            if kind is None:
                prefix.append(folder)
            else:
                found[kind] = folder
    match = scheme.compiled.fullmatch(subject)
    if match is None:
        return None
    groups = {name: _clean(value) for name, value in match.groupdict().items()}
    for kind in _CUT:
        found[kind] = "/".join(v for v in (found[kind], groups.get(kind)) if v) or None
    cut_groups = [name for name in match.re.groupindex if name.startswith("channel") or name in _CUT]
    field = _cut(subject, [match.span(name) for name in cut_groups if match.group(name) is not None])
    field = "_".join([*prefix, *field.split("/")]).strip("_")
    if not field:
        raise NamingError(f"{relative}: naming scheme {scheme.name} leaves no field name (everything is cut)")
    return ParsedName(
        field=field,
        channel=groups.get("channel"),
        well=_well(groups) or well_of(field),
        site=groups.get("field"),
        plane=found["plane"],
        timepoint=found["timepoint"],
    )


def one_file_per_field(relative: PurePosixPath) -> ParsedName:
    """A file taken as a whole field: its name (folders prefixed) is the field name."""
    field = "_".join([*relative.parts[:-1], file_stem(relative.name)])
    return ParsedName(field=field, well=well_of(field))


def file_stem(name: str) -> str:
    """A file name without its image suffix, and without ``.ome`` before ``.tif``."""
    stem = PurePosixPath(name).stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def _clean(value: str | None) -> str | None:
    return None if value is None else " ".join(value.split()) or None


def _cut(text: str, spans: list[tuple[int, int]]) -> str:
    kept, position = [], 0
    for start, end in sorted(spans):
        if start > position:
            kept.append(text[position:start])
        position = max(position, end)
    kept.append(text[position:])
    # A cut between two separators leaves a doubled one ("A01__s1"); cut ends leave dangling ones.
    joined = re.sub(r"([_\-. ])\1+", r"\1", "".join(kept))
    return "/".join(part.strip("_-. ") for part in joined.split("/"))


def _well(groups: dict[str, str | None]) -> str | None:
    if groups.get("well"):
        match = re.fullmatch(r"([A-Za-z]{1,2})\W*0*(\d{1,2})", groups["well"])
        return f"{match[1].upper()}{int(match[2]):02d}" if match else None
    row, column = groups.get("row"), groups.get("column")
    if not row or not column:
        return None
    row_letters = _row_letters(int(row)) if row.isdigit() else row.upper()
    return f"{row_letters}{int(column):02d}"


# --------------------------------------------------------------------------- refusing to guess

# Tokens that name a channel (or a plane / time point) in names no scheme reads: files that differ
# by one of these only are one field's channels (or planes), not two fields.
_CHANNEL_TOKEN = re.compile(
    r"(?<![A-Za-z])(?:channel|ch|wv|w|c|d)\s*\d+(?!\d)"
    r"|(?<![A-Za-z0-9])(?:DAPI|Hoechst|DNA|FITC|GFP|EGFP|TRITC|Cy[357]|RFP|mCherry|YFP|CFP|Texas ?Red"
    r"|Alexa ?\d{3}|AF\d{3}|Mito|AGP|ER|RNA)(?![A-Za-z0-9])"
    r"|wv [^()]+",
    re.IGNORECASE,
)
_STACK_TOKEN = re.compile(r"(?<![A-Za-z])(?:z|t|ZStep_|TimePoint_)\d+(?!\d)", re.IGNORECASE)
_ROW_BEFORE = re.compile(r"r\d+$", re.IGNORECASE)  # "c01" in Operetta's "r01c01" is a column


def channel_like_pair(names: list[str]) -> tuple[str, str, str] | None:
    """Find two names that differ only by a channel-, plane- or time-like token.

    Parameters
    ----------
    names : list of str
        File names (or relative paths) taken as one field each.

    Returns
    -------
    (str, str, str) or None
        The two names and what the token looks like (``"channel"`` or
        ``"plane or time point"``); None when no two names differ so.

    Examples
    --------
    >>> channel_like_pair(["P1_A01f00d0", "P1_A01f00d1"])
    ('P1_A01f00d0', 'P1_A01f00d1', 'channel')
    >>> channel_like_pair(["r01c01f01", "r01c02f01"]) is None
    True
    """
    for kind, token in (("channel", _CHANNEL_TOKEN), ("plane or time point", _STACK_TOKEN)):
        seen: dict[str, tuple[str, str]] = {}
        for name in names:
            for match in token.finditer(name):
                if kind == "channel" and _ROW_BEFORE.search(name[: match.start()]):
                    continue
                skeleton = f"{name[: match.start()]}\0{name[match.end():]}"
                other = seen.setdefault(skeleton, (name, match.group()))
                if other[1].lower() != match.group().lower():
                    return other[0], name, kind
    return None


# --------------------------------------------------------------------------- wells

_ROW_COLUMN = re.compile(r"(?<![A-Za-z0-9])r(\d{1,2})c(\d{1,2})(?!\d)")
# Rows A-P (384) and AA-AF (1536); upper case only, so "s1", "w1", "c0" are no wells.
_WELL = re.compile(r"(?<![A-Za-z0-9])(A[A-F]|[A-P])[-_]?(\d{1,2})(?!\d)")


def well_of(field_name: str) -> str | None:
    """Guess the plate well from a field name no naming scheme parsed.

    Parameters
    ----------
    field_name : str
        A field name such as ``"01-A-01"``, ``"IXMtest_A02_s1"`` or an
        Operetta ``"r02c03f01p01"``.

    Returns
    -------
    str or None
        The well as row letter(s) and two-digit column (``"A01"``), or None
        when the name holds no well.

    Examples
    --------
    >>> well_of("01-A-01"), well_of("IXMtest_A02_s1"), well_of("r02c03f01p01")
    ('A01', 'A02', 'B03')
    >>> well_of("image_0001") is None
    True
    """
    match = _ROW_COLUMN.search(field_name)
    if match:
        row, column = int(match[1]), int(match[2])
        if 1 <= row <= 32 and 1 <= column <= 48:
            return f"{_row_letters(row)}{column:02d}"
    for match in _WELL.finditer(field_name):
        column = int(match[2])
        if 1 <= column <= 48:
            return f"{match[1]}{column:02d}"
    return None


def _row_letters(row: int) -> str:
    return chr(ord("A") + row - 1) if row <= 26 else "A" + chr(ord("A") + row - 27)


def natural_key(text: str) -> tuple:
    """Sort key that puts ``s2`` before ``s10``."""
    parts = re.split(r"(\d+)", text)
    # Odd positions are always the digit runs, so ints never meet strs in comparison.
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), text

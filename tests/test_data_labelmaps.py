"""Label maps: COCO-Stuff-27 against the reference table (written out independently here), COCO-81/171,
Cityscapes-27, VOC, CamVid, ADE; unknown values; custom specs."""

from __future__ import annotations

import numpy as np
import pytest

from causeseg.data.io import DataError
from causeseg.data.labelmaps import LabelMap, get_label_map, list_label_maps

# CAUSE reference section 9.4, copied as text: coarse index, name, fine ids.
COCO27_TABLE = """
0 electronic 71-76
1 appliance 77-82
2 food-things 51-60
3 furniture-things 61-70
4 indoor 83-90
5 kitchen 43-50
6 accessory 25-32
7 animal 15-24
8 outdoor 9-14
9 person 0
10 sports 33-42
11 vehicle 1-8
12 ceiling 101-102
13 floor 100,113-117
14 food-stuff 120-121,152,169
15 furniture-stuff 97,106-107,109,111,122,129,132,155,160,164
16 rawmaterial 99,131,138,142
17 textile 91-92,103-104,108,130,136,140,151,166-167
18 wall 170-176
19 window 179-180
20 building 94-95,127,150,157,165
21 ground 110,124-125,135,139,143-144,146,148,153,158
22 plant 93,96,118,123,128,133,141,162,168
23 sky 105,156
24 solid 126,134,149,159,161,181
25 structural 98,112,137,145,163
26 water 119,147,154,177-178
"""


def _parse_table() -> dict[int, int]:
    fine_to_coarse: dict[int, int] = {}
    for line in COCO27_TABLE.strip().splitlines():
        coarse, _name, ids = line.split()
        for part in ids.split(","):
            lo, _, hi = part.partition("-")
            for f in range(int(lo), int(hi or lo) + 1):
                assert f not in fine_to_coarse, f"fine id {f} listed twice in the test table"
                fine_to_coarse[f] = int(coarse)
    return fine_to_coarse


def test_cocostuff27_every_fine_id():
    table = _parse_table()
    assert sorted(table) == list(range(182))  # the table covers 0..181 exactly once
    lm = get_label_map("cocostuff27")
    raw = np.arange(182)
    np.testing.assert_array_equal(lm.apply(raw), [table[i] for i in range(182)])
    assert lm.apply(np.array([255]))[0] == -1
    assert lm.num_classes == 27 and len(lm.names) == 27
    assert lm.names[0] == "electronic" and lm.names[9] == "person" and lm.names[26] == "water"
    for bad in (182, 200, 254, 256, -1):
        with pytest.raises(DataError, match=str(bad)):
            lm.apply(np.array([[0, bad]]), source="m.png")


ABSENT = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}


def test_coco81():
    lm = get_label_map("coco81")
    things = [i for i in range(90) if i not in ABSENT]
    assert len(things) == 80
    np.testing.assert_array_equal(lm.apply(np.array(things)), np.arange(1, 81))
    np.testing.assert_array_equal(lm.apply(np.arange(91, 182)), np.zeros(91, dtype=int))
    spot = {0: 1, 10: 11, 12: 12, 89: 80, 91: 0, 181: 0, 255: -1, 11: -1, 90: -1, 82: -1}
    for raw, cls in spot.items():
        assert lm.apply(np.array([raw]))[0] == cls, raw
    assert lm.num_classes == 81 and len(lm.names) == 81
    with pytest.raises(DataError):
        lm.apply(np.array([182]))


def test_coco171():
    lm = get_label_map("coco171")
    present = [i for i in range(182) if i not in ABSENT]
    assert len(present) == 171
    np.testing.assert_array_equal(lm.apply(np.array(present)), np.arange(171))
    spot = {0: 0, 10: 10, 12: 11, 89: 79, 91: 80, 181: 170, 11: -1, 90: -1, 255: -1}
    for raw, cls in spot.items():
        assert lm.apply(np.array([raw]))[0] == cls, raw
    assert len(lm.names) == 171


def test_cityscapes27():
    lm = get_label_map("cityscapes27")
    np.testing.assert_array_equal(lm.apply(np.arange(7, 34)), np.arange(27))
    np.testing.assert_array_equal(lm.apply(np.array([0, 1, 2, 3, 4, 5, 6, 255, -1])), [-1] * 9)
    assert lm.apply(np.array([7]))[0] == 0 and lm.apply(np.array([33]))[0] == 26
    assert lm.names[0] == "road" and lm.names[26] == "bicycle" and lm.names[16] == "sky"
    with pytest.raises(DataError, match="34"):
        lm.apply(np.array([34]), source="x.png")


def test_voc_camvid_ade():
    voc = get_label_map("voc21")
    np.testing.assert_array_equal(voc.apply(np.arange(21)), np.arange(21))
    assert voc.apply(np.array([255]))[0] == -1
    assert voc.names[15] == "person" and voc.names[20] == "tvmonitor"
    with pytest.raises(DataError):
        voc.apply(np.array([21]))
    cam = get_label_map("camvid11")
    np.testing.assert_array_equal(cam.apply(np.arange(12)), list(range(11)) + [-1])
    assert cam.names == ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car",
                         "pedestrian", "bicyclist")
    ade = get_label_map("ade150")
    np.testing.assert_array_equal(ade.apply(np.arange(151)), np.arange(-1, 150))
    with pytest.raises(DataError):
        ade.apply(np.array([151]))


def test_error_names_source_and_values():
    lm = get_label_map("camvid11")
    raw = np.zeros((4, 5), dtype=np.uint8)
    raw[1, 1], raw[2, 3] = 12, 40
    with pytest.raises(DataError) as ei:
        lm.apply(raw, source="/some/dir/mask_7.png")
    msg = str(ei.value)
    assert "/some/dir/mask_7.png" in msg and "12" in msg and "40" in msg and "camvid11" in msg


def test_apply_shape_dtype_and_aliases():
    raw = np.random.default_rng(0).integers(0, 12, size=(3, 7, 5)).astype(np.uint8)
    out = get_label_map("camvid").apply(raw)
    assert out.shape == raw.shape and out.dtype == np.int64
    np.testing.assert_array_equal(out, np.where(raw == 11, -1, raw.astype(np.int64)))
    assert get_label_map("cityscapes").name == "cityscapes27"
    assert set(list_label_maps()) == {"cocostuff27", "coco81", "coco171", "cityscapes27", "voc21", "camvid11",
                                      "ade150"}
    with pytest.raises(KeyError, match="presets"):
        get_label_map("nope")
    for name in list_label_maps():
        lm = get_label_map(name)
        assert len(lm.names) == lm.num_classes


def test_from_spec():
    lm = LabelMap.from_spec({"num_classes": 3, "ignore": [255]})
    np.testing.assert_array_equal(lm.apply(np.array([0, 1, 2, 255])), [0, 1, 2, -1])
    with pytest.raises(DataError):
        lm.apply(np.array([3]))
    # remap with YAML-style string keys, a remap to -1, unknown values ignored on request
    lm = LabelMap.from_spec({"num_classes": 2, "remap": {"10": 0, "20": 1, "30": -1}, "ignore": [0],
                             "names": ["a", "b"], "unknown": "ignore"})
    np.testing.assert_array_equal(lm.apply(np.array([10, 20, 30, 0, 5, 999])), [0, 1, -1, -1, -1, -1])
    assert lm.names == ("a", "b")
    assert get_label_map({"num_classes": 4}).num_classes == 4
    for bad in [{"ignore": [1]}, {"num_classes": 2, "names": ["x"]}, {"num_classes": 2, "remap": {1: 5}},
                {"num_classes": 2, "colour": 1}, {"num_classes": "two"}, [1, 2]]:
        with pytest.raises(DataError, match="label_spec"):
            LabelMap.from_spec(bad)  # type: ignore[arg-type]

"""Label maps: shipped maps cover their labelers, unmapped classes fail, user files work."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from bevctl.config import CLASS_SETS, class_set_from_name
from bevctl.errors import BevctlError
from bevctl.pseudolabel.label_maps import (
    IGNORE_ID,
    apply_label_map,
    resolve_label_map,
    select_label_map,
    shipped_label_maps,
)

SYNTH = ["sky", "road", "lane_marking", "road_divider_marking", "crosswalk", "stop_line", "curb",
         "sidewalk", "other_ground", "vehicle"]
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
              "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
              "motorcycle", "bicycle"]


def _id2label(names: list[str]) -> dict[int, str]:
    return dict(enumerate(names))


def test_shipped_maps_have_the_published_class_counts() -> None:
    maps = shipped_label_maps()
    assert set(maps) == {"synth", "cityscapes", "mapillary-vistas-v1.2", "mapillary-vistas-v2.0"}
    # v1.2: 65 classes + Unlabeled; v2.0: 124 classes (Unlabeled included); cityscapes 19 + unlabeled.
    assert len(maps["mapillary-vistas-v1.2"].classes) == 66
    assert len(maps["mapillary-vistas-v2.0"].classes) == 124
    assert len(maps["cityscapes"].classes) == 20
    assert len(maps["synth"].classes) == 10


@pytest.mark.parametrize("set_name", sorted(CLASS_SETS))
@pytest.mark.parametrize("map_name", ["synth", "cityscapes", "mapillary-vistas-v1.2", "mapillary-vistas-v2.0"])
def test_every_class_of_every_shipped_map_resolves(map_name: str, set_name: str) -> None:
    lm = shipped_label_maps()[map_name]
    names = list(lm.classes)  # normalised names; matching is case-insensitive
    lut = resolve_label_map(_id2label(names), class_set_from_name(set_name))
    cs = class_set_from_name(set_name)
    valid = set(range(cs.num_classes)) | {IGNORE_ID}
    assert set(lut[: len(names)].tolist()) <= valid
    assert (lut[len(names):] == IGNORE_ID).all()  # ids the labeler does not have: ignore


def test_mapillary_v12_names_map_to_the_expected_bev_classes() -> None:
    v12 = [n for n in shipped_label_maps()["mapillary-vistas-v1.2"].classes]
    # Use the real spelling (title case) to exercise case-insensitive matching.
    names = ["Bird", "Curb", "Road", "Lane Marking - Crosswalk", "Lane Marking - General", "Sky", "Car", "Sidewalk"]
    assert all(n.casefold() in v12 for n in names)
    id2label = _id2label(names)
    hd = class_set_from_name("hdmapnet")  # boundary=1, ped_crossing=2, divider=3
    lut = resolve_label_map(id2label, hd)
    assert lut[:8].tolist() == [255, 1, 0, 2, 3, 255, 255, 0]
    mk = class_set_from_name("markings")  # boundary, ped_crossing, stop_line, road_divider, lane_divider
    lut = resolve_label_map(id2label, mk)
    assert lut[:8].tolist() == [255, 1, 0, 2, 5, 255, 255, 0]


def test_mapillary_v20_fine_markings() -> None:
    names = ["Road", "Lane Marking - Dashed Line", "Lane Marking - Stop Line", "Lane Marking (only) - Crosswalk",
             "Lane Marking - Arrow (Left)", "Traffic Cone", "Road Shoulder"]
    id2label = _id2label(names)
    assert select_label_map(id2label).name == "mapillary-vistas-v2.0"
    mk = resolve_label_map(id2label, class_set_from_name("markings"))
    assert mk[:7].tolist() == [0, 5, 3, 2, 0, 255, 0]
    hd = resolve_label_map(id2label, class_set_from_name("hdmapnet"))  # no stop_line class: background
    assert hd[:7].tolist() == [0, 3, 0, 2, 0, 255, 0]


def test_synth_map_and_apply() -> None:
    id2label = _id2label(SYNTH)
    assert select_label_map(id2label).name == "synth"
    lut = resolve_label_map(id2label, class_set_from_name("markings"))
    assert lut[:10].tolist() == [255, 0, 5, 4, 2, 3, 1, 0, 0, 255]
    labels = np.array([[0, 1, 2], [3, 4, 9]], dtype=np.uint8)
    assert apply_label_map(labels, lut).tolist() == [[255, 0, 5], [4, 2, 255]]
    hd = resolve_label_map(id2label, class_set_from_name("hdmapnet"))
    assert hd[:10].tolist() == [255, 0, 3, 3, 2, 0, 1, 0, 0, 255]


def test_cityscapes_warns_no_markings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bevctl.pseudolabel.label_maps"):
        lut = resolve_label_map(_id2label(CITYSCAPES), class_set_from_name("hdmapnet"))
    assert "no road-marking" in caplog.text
    assert set(lut[:19].tolist()) == {0, 255}


def test_unknown_labeler_needs_a_user_map() -> None:
    with pytest.raises(BevctlError, match="no shipped label map.*'zebra'"):
        resolve_label_map(_id2label(["road", "zebra"]), class_set_from_name("hdmapnet"))


def test_user_map_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "classes": {
        "asphalt": "background", "paint": ["lane_divider", "divider"], "zebra": "ped_crossing", "tree": "ignore"}}))
    id2label = _id2label(["asphalt", "Paint", "zebra", "tree"])
    lut = resolve_label_map(id2label, class_set_from_name("hdmapnet"), user_map_path=path)
    assert lut[:4].tolist() == [0, 3, 2, 255]
    # An unmapped class in the user's file is an error naming it, not background.
    with pytest.raises(BevctlError, match="no entry for labeler class 'curbstone'"):
        resolve_label_map(_id2label(["asphalt", "curbstone"]), class_set_from_name("hdmapnet"), user_map_path=path)


def test_user_map_with_base_overrides_and_bad_targets(tmp_path: Path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text(yaml.safe_dump({"base": "synth", "classes": {"stop_line": "ignore"}}))
    lut = resolve_label_map(_id2label(SYNTH), class_set_from_name("markings"), user_map_path=path)
    assert lut[5] == 255 and lut[4] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"classes": {"road": "background", "paint": "lane_divider"}}))
    with pytest.raises(BevctlError, match="'paint'.*none of which is in class set 'hdmapnet'"):
        resolve_label_map(_id2label(["road", "paint"]), class_set_from_name("hdmapnet"), user_map_path=bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"clases": {"road": "background"}}))
    with pytest.raises(BevctlError, match="unknown key"):
        resolve_label_map(_id2label(["road"]), class_set_from_name("hdmapnet"), user_map_path=typo)

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


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_user_maps_are_one_line_naming_the_file_and_field(tmp_path: Path) -> None:
    hd = class_set_from_name("hdmapnet")
    cases = [
        ({"classes": {"road": 5}}, r"classes\.road: expected a class name or a non-empty list of class names, got 5"),
        ({"classes": {"road": []}}, r"classes\.road: expected a class name or a non-empty list"),
        ({"classes": {"road": ["background", ""]}}, r"classes\.road: expected .*got \['background', ''\]"),
        ({"classes": {"road": ["background", 3]}}, r"classes\.road: expected .*got \['background', 3\]"),
        ({"classes": ["road"]}, r"'classes' must be a non-empty mapping of class name -> BEV class"),
        ({"classes": {}}, r"'classes' must be a non-empty mapping"),
        ({"classes": {"Road": "background", "road": "ignore"}}, r"class 'road' is listed twice \(as 'Road'\)"),
        ({"classes": {"road": "background"}, "warning": 3}, r"'warning' must be a string"),
        ({"classes": {"road": "background"}, "name": 3}, r"'name' must be a string"),
        ({"base": "nope", "classes": {"road": "background"}},
         r"unknown base label map 'nope' \(known: synth, cityscapes, mapillary-vistas-v1.2, mapillary-vistas-v2.0\)"),
    ]
    for i, (data, message) in enumerate(cases):
        path = _write(tmp_path, f"bad{i}.yaml", data)
        with pytest.raises(BevctlError, match=rf"^{path}: {message}"):
            resolve_label_map(_id2label(["road"]), hd, user_map_path=path)


def test_user_map_name_source_description_and_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, "my_map.yaml", {"description": "mine", "warning": "no  markings\n here",
                                            "classes": {"road": "background"}})
    lm = select_label_map(_id2label(["road"]), path)
    assert (lm.name, lm.source, lm.warning) == ("my_map", str(path), "no  markings\n here")  # name: the file's stem
    with caplog.at_level(logging.WARNING, logger="bevctl.pseudolabel.label_maps"):
        resolve_label_map(_id2label(["road"]), class_set_from_name("hdmapnet"), user_map_path=path)
    assert [r.getMessage() for r in caplog.records] == ["label map 'my_map': no markings here"]
    # a map on a shipped base keeps the base's warning unless it has its own
    city = shipped_label_maps()["cityscapes"]
    inherit = select_label_map(_id2label(["road"]), _write(tmp_path, "c1.yaml", {"base": "cityscapes", "classes": {"car": "ignore"}}))
    assert city.warning and inherit.warning == city.warning
    assert inherit.classes["car"] == ("ignore",) and inherit.classes["road"] == city.classes["road"]
    own = select_label_map(_id2label(["road"]), _write(tmp_path, "c2.yaml", {"base": "cityscapes", "warning": "mine",
                                                                              "classes": {"car": "ignore"}}))
    assert own.warning == "mine"
    unmapped = _write(tmp_path, "u.yaml", {"name": "u", "classes": {"road": "background"}})
    with pytest.raises(BevctlError, match=rf"^label map 'u' \({unmapped}\) has no entry for labeler class 'tree' \(id 1\); "
                                          "map it to a BEV class, background or ignore$"):
        resolve_label_map(_id2label(["road", "tree"]), class_set_from_name("hdmapnet"), user_map_path=unmapped)


def test_nearest_shipped_map_and_the_missing_classes_in_the_error() -> None:
    hint = "; pass a label map YAML file mapping every class name to a BEV class, background or ignore$"
    names = SYNTH + ["zebra"]
    with pytest.raises(BevctlError, match=r"\(nearest: 'synth', which lacks 'zebra'\)" + hint):
        select_label_map(_id2label(names))
    with pytest.raises(BevctlError, match=r"\(nearest: 'cityscapes', which lacks 'zebra'\)"):
        select_label_map(_id2label(CITYSCAPES + ["zebra"]))
    many = ["road", "sky"] + [f"thing{i}" for i in range(7)]
    with pytest.raises(BevctlError, match=r"which lacks 'thing0', 'thing1', 'thing2', 'thing3', 'thing4' and 2 more\)"):
        select_label_map(_id2label(many))
    five = ["road"] + [f"thing{i}" for i in range(5)]
    with pytest.raises(BevctlError, match=r"which lacks 'thing0', 'thing1', 'thing2', 'thing3', 'thing4'\);"):
        select_label_map(_id2label(five))
    six = ["road"] + [f"thing{i}" for i in range(6)]
    with pytest.raises(BevctlError, match=r"'thing4' and 1 more\);"):
        select_label_map(_id2label(six))


def test_lut_is_uint8_over_all_256_ids_and_class_ids_must_fit(tmp_path: Path) -> None:
    hd = class_set_from_name("hdmapnet")
    lut = resolve_label_map(_id2label(SYNTH), hd)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    path = _write(tmp_path, "m.yaml", {"classes": {"road": "background", "paint": "divider"}})
    for cid in (255, 300, -1, "3"):
        with pytest.raises(BevctlError, match=rf"^labeler class id {cid!r} \('road'\) is outside 0..254$"):
            resolve_label_map({cid: "road"}, hd, user_map_path=path)
    assert resolve_label_map({254: "paint"}, hd, user_map_path=path)[254] == 3
    bad = _write(tmp_path, "b.yaml", {"name": "b", "classes": {"paint": ["lane_divider", "stop_line"]}})
    with pytest.raises(BevctlError, match=r"^label map 'b': class 'paint' -> \['lane_divider', 'stop_line'\], none of "
                                          r"which is in class set 'hdmapnet' \(boundary, ped_crossing, divider\) nor background/ignore$"):
        resolve_label_map({0: "paint"}, hd, user_map_path=bad)


def test_resolved_map_record_names_the_map_its_source_and_every_class(tmp_path: Path, monkeypatch) -> None:
    """The record a training run keeps of its label map: name, "built in" or the YAML file's
    absolute path, and each labeler class's BEV class by name (agreeing with the LUT)."""
    from bevctl.pseudolabel.label_maps import resolve_label_map_record

    hd = class_set_from_name("hdmapnet")
    names = {0: "background", 255: "ignore", **{k + 1: c for k, c in enumerate(hd.classes)}}
    lut, record = resolve_label_map_record(_id2label(SYNTH), hd)
    assert set(record) == {"name", "source", "table"}
    assert record["name"] == "synth" and record["source"] == "built in"
    assert record["table"] == {name: names[int(lut[cid])] for cid, name in enumerate(SYNTH)}
    assert list(record["table"]) == SYNTH  # in labeler id order
    assert (record["table"]["road"], record["table"]["curb"], record["table"]["sky"]) == ("background", "boundary",
                                                                                       "ignore")
    path = _write(tmp_path, "m.yaml", {"name": "mine", "classes": {"road": "background", "paint": "divider"}})
    monkeypatch.chdir(tmp_path)
    _, record = resolve_label_map_record({0: "road", 1: "paint"}, hd, user_map_path="m.yaml")  # a relative path
    assert record == {"name": "mine", "source": str(path.resolve()), "table": {"road": "background", "paint": "divider"}}

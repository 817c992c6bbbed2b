"""The real-data recipe (README "nuScenes recipe", configs/nuscenes/, examples/) is valid:
every config loads and builds its model at full size on the meta device, every command and
option the job scripts use exists, and the shipped label map covers the recipe's labeler."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bevctl.config import class_set_from_name, grid_from_name
from bevctl.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "nuscenes").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "examples").rglob("*.sbatch")) + sorted((ROOT / "examples").rglob("*_job.sh"))
RECIPE_LABELER = "facebook/mask2former-swin-large-mapillary-vistas-semantic"


def test_recipe_files_exist_and_readme_names_them() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(CONFIGS) >= 6 and len(SCRIPTS) >= 7 and (ROOT / "examples/slurm/common.sh").is_file()
    for path in CONFIGS + SCRIPTS:
        assert path.relative_to(ROOT).as_posix() in readme or path.name in readme, f"README does not name {path}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_model_builds_at_full_size(path: Path) -> None:
    from bevctl.train.build import resolve
    from bevctl.train.model import BEVFormer

    cfg = load_train_config(str(path))
    assert cfg.grid == "hdmapnet" and cfg.model in ("small", "base")
    grid = grid_from_name(cfg.grid)
    classes = class_set_from_name(cfg.class_set)
    mc = dataclasses.replace(resolve(cfg).model_config, backbone_pretrained=None)  # no download in tests
    with torch.device("meta"):
        model = BEVFormer(mc, grid, classes.num_classes)
        h, w = mc.image_hw
        out = model(torch.empty(1, 6, 3, h, w), torch.empty(1, 6, 3, 3), torch.empty(1, 6, 4, 4))
    assert out.logits.shape == (1, classes.num_classes, *grid.shape)
    assert resolve(cfg).model_config.backbone_pretrained == cfg.backbone_pretrained


def _help(command: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "bevctl.cli", *command, "--help"],
                          capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_use_existing_commands_and_options(path: Path) -> None:
    lines = [ln for ln in path.read_text().replace("\\\n", " ").splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    calls = re.findall(r"(?:\$BEVCTL|torchrun_all|\bbevctl)\s+([a-z-]+)((?:\s+(?:--[a-z-]+|\"[^\"]*\"|[^\s|;]+))*)", text)
    calls = [(cmd, args) for cmd, args in calls if not cmd.startswith("-")]
    assert calls, f"{path.name} calls no bevctl command"
    for cmd, args in calls:
        usage = _help([cmd])
        for option in re.findall(r"(--[a-z][a-z-]*)", args):
            assert option in usage, f"{path.name}: bevctl {cmd} has no option {option}"
        for cfg in re.findall(r"\$CONFIGS/([a-z_]+)\$PRESET\.yaml", args):
            for preset in ("small", "base"):
                assert (ROOT / "configs" / "nuscenes" / f"{cfg}{preset}.yaml").is_file()


def test_shipped_label_map_covers_the_recipe_labeler() -> None:
    """Every class of the Mapillary Vistas v1.2 checkpoint maps to a BEV class, background or
    ignore, for both class sets; markings, crosswalks and curbs reach BEV classes."""
    import yaml

    from bevctl.pseudolabel.label_maps import resolve_label_map

    data = yaml.safe_load((ROOT / "bevctl/configs/label_maps/mapillary_vistas_v1.2.yaml").read_text())
    assert RECIPE_LABELER in (ROOT / "bevctl/configs/label_maps/mapillary_vistas_v1.2.yaml").read_text()
    id2label = dict(enumerate(data["classes"]))
    assert len(id2label) >= 65
    for set_name in ("hdmapnet", "markings"):
        classes = class_set_from_name(set_name)
        lut = resolve_label_map(id2label, classes)
        ids = {name: int(lut[i]) for i, name in id2label.items()}
        assert ids["Lane Marking - Crosswalk"] == classes.classes.index("ped_crossing") + 1
        assert ids["Curb"] == classes.classes.index("boundary") + 1
        assert ids["Road"] == 0 and ids["Sky"] == 255 and ids["Car"] == 255
        assert 0 < ids["Lane Marking - General"] < 255

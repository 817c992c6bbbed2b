"""Mutation testing of the core modules with mutmut, one module at a time, against the fast tests
relevant to that module (``make mutants``; not in CI; resumable).

Each module gets its own work directory ``.cache/mutants/<name>/`` holding a copy of ``bevctl/``
and ``tests/`` and a ``pyproject.toml`` whose ``[tool.mutmut]`` section mutates only that module
and collects test coverage only from that module's test files. mutmut then runs, for every
mutant, only the tests that executed the mutated function. Results stay in the work directory:
a rerun skips every mutant that already has a result (after an interruption it picks up where
it stopped); a changed source file gets new mutants. ``--fresh`` starts a module from scratch.

The tests must import the mutated copy, never this checkout: PYTHONPATH is removed from the
environment of mutmut (the editable install's finder comes after ``sys.path``, where mutmut
puts ``mutants/`` first), and every run first checks that a planted mutant is killed.

    python bench/mutation.py                      # every module, smallest first
    python bench/mutation.py --modules evaluate geometry --max-children 1
    python bench/mutation.py --report-only        # rewrite bench/results/mutation.{json,md}

Writes ``bench/results/mutation.json`` and ``bench/results/mutation.md`` (per module: mutants,
killed, survived, timed out, no tests, the mutants judged equivalent with the reason, the
surviving ones, the wall time of the last run).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "mutants"
RESULTS = ROOT / "bench" / "results"
MUTMUT = Path(sys.executable).with_name("mutmut")


@dataclass(frozen=True)
class Module:
    name: str
    source: str  # the file mutated, relative to the repository root
    tests: tuple[str, ...]  # pytest arguments: the fast tests relevant to this module


MODULES = (  # smallest first
    Module("label_maps", "bevctl/pseudolabel/label_maps.py", ("tests/test_label_maps.py",)),
    Module("evaluate", "bevctl/train/evaluate.py", ("tests/test_evaluate.py", "tests/test_checkpoint.py")),
    Module("checkpoint", "bevctl/train/checkpoint.py",
           ("tests/test_checkpoint.py", "tests/test_trainer.py::test_interrupted_and_resumed_run_is_bit_identical")),
    Module("attention", "bevctl/train/model/attention.py", ("tests/test_model.py",)),
    # without the end-to-end test on a synthetic dataset (it builds the dataset in every mutant's run)
    Module("geometry", "bevctl/geometry.py",
           ("tests/test_geometry.py", "tests/test_losses.py", "-k", "not reproduces_the_image_ground_truth")),
    Module("losses", "bevctl/train/losses.py", ("tests/test_losses.py", "-k", "not reproduces_the_image_ground_truth")),
    # without the compile test (71 s of a 90 s file): it compares the compiled and the eager forward of the
    # same mutated code, so a mutant changes both sides alike; the eager tests see what it could see
    Module("encoder", "bevctl/train/model/encoder.py", ("tests/test_model.py", "-k", "not torch_compile")),
    Module("bev_gt", "bevctl/data/bev_gt.py", ("tests/test_bev_gt.py",)),
    Module("store_records", "bevctl/storage/base.py",
           ("tests/test_label_store.py", "tests/test_gt_store.py", "tests/test_pseudolabel_job.py")),
)
BY_NAME = {m.name: m for m in MODULES}

# Mutants that survive because no behaviour can tell them apart from the original, judged by
# reading each one (`mutmut show NAME` in the module's work directory). name -> reason.
_F32 = ("float32 instead of float64 cell distances or band edges: the bands differ only for a cell centre "
        "within float32 rounding (~1e-7 relative) of an edge")
_GT_IDS = "differs only for target ids from C to 254, which no GT or pseudo-label map holds (0..C-1 or 255)"
_CPU = ("the device argument dropped: the same on a CPU; differs only with an accelerator, which the fast "
        "tests do not have")
_MARGIN = ("a larger clip margin than 2 line widths + 2 cells + 1 m (or, for 2/resolution, one still above "
           "2 widths + 1 m): clipping stays invisible inside the grid once the cut edges lie more than half a "
           "line width beyond the outermost cell centres; only more map geometry is fetched and clipped")
_RMTREE = ("`ignore_errors=True` off for the removal of the build's temp folder or the old store's trash "
           "folder: differs only when that removal itself fails (another process deleting it at the same moment)")
EQUIVALENT: dict[str, str] = {
    "bevctl.pseudolabel.label_maps.x_resolve_target__mutmut_10":
        "`return -1` -> `return -2`: the only caller tests `bev < 0`",
    "bevctl.train.evaluate.x_range_bands__mutmut_8": _F32,
    "bevctl.train.evaluate.x_range_bands__mutmut_10": _F32,
    "bevctl.train.evaluate.x_range_bands__mutmut_20": _F32,
    "bevctl.train.evaluate.x_range_bands__mutmut_22": _F32,
    "bevctl.train.evaluate.x_update_confusion_by_band__mutmut_5":
        "`gt < c` -> `gt <= c`: differs only for a GT id equal to C; GT holds 0..C-1 or 255",
    "bevctl.geometry.x_warp_bev__mutmut_8": _CPU,
    "bevctl.geometry.x_warp_bev__mutmut_11": _CPU,
    "bevctl.geometry.x_warp_bev__mutmut_16":
        "`reshape(1, -1, 3)` -> `reshape(-1, 3)`: the following `expand(b, -1, -1)` adds the batch dimension "
        "either way",
    "bevctl.geometry.x_pixel_grid__mutmut_11": _CPU,
    "bevctl.geometry.x_pixel_grid__mutmut_14": _CPU,
    "bevctl.geometry.x_pixel_grid__mutmut_24": _CPU,
    "bevctl.geometry.x_pixel_grid__mutmut_27": _CPU,
    "bevctl.geometry.x_pixel_grid__mutmut_34":
        "`meshgrid(..., indexing=\"ij\")` -> `indexing=None`: torch's default is 'ij' (it only adds a warning)",
    "bevctl.geometry.x_bev_cell_centers__mutmut_7": _CPU,
    "bevctl.geometry.x_bev_cell_centers__mutmut_10": _CPU,
    "bevctl.geometry.x_warp_bev__mutmut_48":
        "`[..., :2]` -> `[..., :3]` on the source points: only their x and y columns are ever read",
    "bevctl.train.losses.x_compute_ray_grid__mutmut_1":
        "default max_range 1000 m -> 1001 m: a hit also has to lie inside the BEV grid (tens of metres), so the "
        "range only matters for grids over a kilometre across",
    "bevctl.train.losses.xǁRayGridCacheǁ__init____mutmut_2": "the same as compute_ray_grid mutant 1 (the cache's default)",
    "bevctl.train.losses.x_compute_ray_grid__mutmut_9": _CPU,
    "bevctl.train.losses.x_compute_ray_grid__mutmut_13": _CPU,
    "bevctl.train.losses.x_rig_key__mutmut_3":
        "a 17-byte digest instead of 16: the key is only compared with keys made the same way (equal iff the "
        "hashed bytes are equal, barring a hash collision)",
    "bevctl.train.losses.x_rig_key__mutmut_8": _CPU,
    "bevctl.train.losses.x_rig_key__mutmut_10": _CPU,
    "bevctl.train.losses.xǁRayGridCacheǁ__init____mutmut_1":
        "the LRU holds 65 rigs instead of 64 by default: a memory bound only (a nuScenes log has one rig; "
        "tests pass max_entries)",
    "bevctl.train.losses.xǁRayGridCacheǁget__mutmut_11": _CPU,
    "bevctl.train.losses.xǁRayGridCacheǁget__mutmut_37":
        "`popitem(last=False)` -> `last=None`: None is false, so the oldest entry is evicted either way",
    "bevctl.train.losses.x__per_sample_mean__mutmut_2":
        "the mask left as bool: multiplying float values by it promotes it to float",
    "bevctl.train.losses.x__per_sample_mean__mutmut_13":
        "the second return value (how many samples have a valid value) changed: both callers discard it",
    "bevctl.train.losses.x__per_sample_mean__mutmut_14": "the same as mutant 13",
    "bevctl.train.losses.x_reprojection_loss__mutmut_93":
        "`class_weights.to(ce)` -> `.to(None)`: the same as supervised_loss mutant 30",
    "bevctl.train.losses.x_supervised_loss__mutmut_7": _GT_IDS,
    "bevctl.train.losses.x_supervised_loss__mutmut_9": _GT_IDS,
    "bevctl.train.losses.x_supervised_loss__mutmut_30":
        "`class_weights.to(ce)` -> `.to(None)`: the same for float32 weights on the loss's device (as the trainer "
        "passes them); other weights would only change the loss's dtype or fail on the device",
    "bevctl.train.losses.x_dice_loss__mutmut_12":
        "the one-hot map left as int64: multiplying and adding it to float probabilities promotes it to float",
    "bevctl.train.losses.x_dice_loss__mutmut_31":
        "the mask left as bool: multiplying float probabilities by it promotes it to float",
    "bevctl.geometry.x_make_transform__mutmut_14": _CPU,
    "bevctl.geometry.x_make_transform__mutmut_19": _CPU,
    "bevctl.geometry.x_ego_to_pixels__mutmut_13":
        "eps not passed on to cam_to_pixels (its default used): eps only changes the pixels of points with depth "
        "<= eps, which are documented as meaningless (callers mask them with depth > eps)",
    "bevctl.geometry.x_pixel_grid__mutmut_37": "the same as mutant 34 (`indexing=\"ij\"` dropped: torch's default)",
    "bevctl.geometry.x_rays_to_ground__mutmut_1":
        "default max_range 1000 m -> 1001 m: the only caller (compute_ray_grid) passes max_range",
    "bevctl.geometry.x_rays_to_ground__mutmut_28": "`dz < -1e-6` -> `<=`: differs only for a ray with dz exactly -1e-6",
    "bevctl.geometry.x_rays_to_ground__mutmut_29":
        "`dz < -1e-6` -> `dz < 1e-6`: the rays let in (|dz| < 1e-6) hit the ground over 1000 km away (t > 0 "
        "with dz < 0) or behind the camera (t <= 0), so max_range or `t > 0` rejects them",
    "bevctl.geometry.x_rays_to_ground__mutmut_42":
        "the placeholder dz of rays already invalid changed (-1 -> +1): their points are replaced by zeros",
    "bevctl.geometry.x_rays_to_ground__mutmut_43": "the same as mutant 42 (-1 -> -2)",
    "bevctl.geometry.x_rays_to_ground__mutmut_50":
        "`t > 0` -> `t >= 0`: t = 0 only for a camera exactly at ground height",
    "bevctl.geometry.x_rays_to_ground__mutmut_67":
        "`dist < max_range` -> `<=`: differs only for a hit exactly max_range away",
    "bevctl.geometry.x_bev_cell_centers__mutmut_18": _CPU,
    "bevctl.geometry.x_bev_cell_centers__mutmut_21": _CPU,
    "bevctl.geometry.x_bev_cell_centers__mutmut_26": "the same as pixel_grid mutant 34 (`indexing=None`: torch's default 'ij')",
    "bevctl.geometry.x_bev_cell_centers__mutmut_29": "the same as pixel_grid mutant 34 (`indexing` dropped)",
    "bevctl.geometry.x_sample_bev__mutmut_16":
        "`align_corners=False` -> `None`: grid_sample treats None as False (it only adds a warning)",
    "bevctl.geometry.x_sample_bev__mutmut_20": "`padding_mode=\"zeros\"` dropped: grid_sample's default",
    "bevctl.geometry.x_sample_bev__mutmut_21": "the same as mutant 16 (argument dropped)",
    "bevctl.geometry.x_pix_T_cam_4x4__mutmut_5": _CPU,
    "bevctl.geometry.x_pix_T_cam_4x4__mutmut_10": _CPU,
    "bevctl.train.losses.x_move_ray_grid__mutmut_22":
        "`rays.hit` used even when None: every grid moved comes from compute_ray_grid, which sets hit",
    "bevctl.train.losses.x_move_ray_grid__mutmut_26":
        "the moved grid's hit dropped: nothing reads it (batch() keeps xy and valid only)",
    "bevctl.train.losses.x_move_ray_grid__mutmut_29": "the same as mutant 26",
    "bevctl.train.losses.x_temporal_loss__mutmut_13":
        "two channels of ones appended instead of one: the cover is read from channel C only",
    "bevctl.train.losses.x_temporal_loss__mutmut_30":
        "`cover > 0.999` -> `>= 0.999`: differs only for a cover of exactly 0.999",
    "bevctl.train.losses.x_reprojection_loss__mutmut_19": _GT_IDS,
    "bevctl.train.losses.x_reprojection_loss__mutmut_22":
        "`min_confidence > 0` -> `>= 0`: a threshold of 0 keeps every pixel (confidences lie in [0, 1])",
    "bevctl.train.evaluate.x_iou_from_confusion__mutmut_3":
        "`np.asarray(conf, dtype=np.int64)` -> dtype None: the counts are integers either way (callers pass "
        "int64 arrays or lists of ints) and every output goes through int() or a division",
    "bevctl.train.evaluate.x_iou_from_confusion__mutmut_5": "the same as mutant 3 (dtype argument dropped)",
    "bevctl.train.evaluate.x_update_confusion_by_band__mutmut_15":
        "`.to(conf)` -> `.to(None)`: bincount is already int64 like the confusion array",
    "bevctl.train.checkpoint.x_load_checkpoint__mutmut_13":
        "a local checkpoint read into memory and loaded from a BytesIO instead of by path: torch.load gives the "
        "same tensors and raises the same errors from either (only the memory use differs)",
    "bevctl.train.checkpoint.x_load_checkpoint__mutmut_19": "the same as mutant 13 (`... and False`)",
    "bevctl.train.checkpoint.x_rng_state__mutmut_12":
        "numpy's MT19937 key saved as a uint32 tensor instead of int64 (dtype None): torch saves and loads "
        "uint32 tensors with weights_only=True, and set_rng_state casts the key to uint32 either way",
    "bevctl.train.checkpoint.x_rng_state__mutmut_14": "the same as mutant 12 (dtype argument dropped)",
    "bevctl.train.checkpoint.x_set_rng_state__mutmut_10":
        "the key cast to float64 (`astype(None)`) instead of uint32: float64 holds every 32-bit value exactly "
        "and np.random.set_state converts the key to uint32 itself",
    "bevctl.train.checkpoint.x_save_checkpoint__mutmut_33":
        "`keep > 0` -> `keep >= 0`: with keep 0 `sorted(steps)[:-0]` is empty, so nothing is pruned either way",
    "bevctl.train.model.attention.x__bilinear_zero_pad__mutmut_7":
        "the accumulator created as float32 zeros instead of the image's dtype: the reference passes float64 "
        "images, and adding the first float64 term promotes the (exact) zeros to float64 before any rounding",
    "bevctl.train.model.attention.x__bilinear_zero_pad__mutmut_9": "the same as mutant 7 (dtype argument dropped)",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_5":
        "`torch.arange(num_heads, dtype=torch.float32)` -> dtype None: the int64 range times a Python float is "
        "float32 (torch's default dtype) with the same values",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_7": "the same as mutant 5 (dtype argument dropped)",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_16":
        "`torch.stack(..., -1)` -> `+1`: for 1-d inputs dimension 1 is the last one",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_24":
        "`max(-1, ...)` -> `max(+1, ...)` on the (M, 2) directions: dimension 1 is the last one",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_32":
        "the point scale viewed (1, P, 1) instead of (1, 1, P, 1): broadcasting against the (M, 1, 1, 2) "
        "directions aligns it the same way",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_33": "the same as mutant 32",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_38":
        "the point scale as int64 (dtype None): multiplied by the float32 directions it gives the same float32 "
        "values",
    "bevctl.train.model.attention.x_init_sampling_offsets__mutmut_41": "the same as mutant 38 (dtype argument dropped)",
    "bevctl.train.model.attention.x_no_autocast__mutmut_5":
        "autocast left enabled inside the op: CPU autocast lowers none of the op's calls (grid_sample, mul, sum "
        "run in float32 either way); differs only on CUDA, which the fast tests do not have",
    "bevctl.train.model.attention.x_no_autocast__mutmut_6": "the same as mutant 5 (`enabled=True`)",
    "bevctl.train.model.attention.x_ms_deform_attn__mutmut_75":
        "`align_corners=False` -> `None`: grid_sample treats None as False (it only adds a warning)",
    "bevctl.train.model.attention.x_ms_deform_attn__mutmut_78": "`mode=\"bilinear\"` dropped: grid_sample's default",
    "bevctl.train.model.attention.x_ms_deform_attn__mutmut_79":
        "`padding_mode=\"zeros\"` dropped: grid_sample's default",
    "bevctl.train.model.attention.x_ms_deform_attn__mutmut_80": "the same as mutant 75 (argument dropped)",
    "bevctl.data.bev_gt.x__bands__mutmut_2":
        "`g is not None and not g.is_empty` -> `or`: no caller passes None (the lines come from "
        "shapely.intersection or a non-None boundary), and an empty line buffers to an empty polygon, dropped after",
    "bevctl.data.bev_gt.x__bands__mutmut_14":
        "round joins drawn with shapely's default 8 segments per quarter circle instead of 4: both approximate the "
        "documented round join (8 more closely); they differ only for a centre within r(1-cos 22.5 deg) = 1.1 cm "
        "(r = 0.15 m) of a join's arc, where no documented behaviour prefers either",
    "bevctl.data.bev_gt.x__bands__mutmut_16": "`join_style=\"round\"` dropped: shapely's default",
    "bevctl.data.bev_gt.x__bands__mutmut_18":
        "`np.array(geoms, dtype=object)` -> dtype None: shapely 2 geometries are not sequences, so numpy makes "
        "the same 1-d object array",
    "bevctl.data.bev_gt.x__bands__mutmut_20": "the same as mutant 18 (dtype argument dropped)",
    "bevctl.data.bev_gt.x__outline__mutmut_6": "the same as _bands mutant 18 (np.array of polygons, dtype None)",
    "bevctl.data.bev_gt.x__outline__mutmut_8": "the same as _bands mutant 18 (dtype argument dropped)",
    "bevctl.data.bev_gt.x__outline__mutmut_11":
        "`~shapely.is_valid(None)` is True: make_valid is applied to every polygon, and it returns a valid polygon "
        "unchanged",
    "bevctl.data.bev_gt.x_grid_margin__mutmut_4": _MARGIN,
    "bevctl.data.bev_gt.x_grid_margin__mutmut_5": _MARGIN,
    "bevctl.data.bev_gt.x_grid_margin__mutmut_6": _MARGIN,
    "bevctl.data.bev_gt.x_grid_margin__mutmut_7": _MARGIN,
    "bevctl.data.bev_gt.x_grid_box_global__mutmut_9":
        "the box corners lifted to z = 1: the box moves by the ego z axis's global (x, y), at most 1 m and only for "
        "a tilted pose, which the margin's extra 1 m absorbs (the clip stays >= 2 widths + 2 cells beyond the grid)",
    "bevctl.data.bev_gt.x_grid_box_global__mutmut_13":
        "`np.asarray(global_T_ego, dtype=np.float64)` -> dtype None: multiplied by the float64 corners either way",
    "bevctl.data.bev_gt.x_grid_box_global__mutmut_15": "the same as mutant 13 (dtype argument dropped)",
    "bevctl.storage.base.x__create_remote__mutmut_21":
        "`remove_tree(url)` -> `remove_tree(None)` (a no-op): the following open_group(mode=\"w\") clears "
        "everything under the prefix itself (a user's file left inside the old store is gone either way)",
    "bevctl.storage.base.x__create_remote__mutmut_25": "`zarr_format=3` -> None: zarr-python 3's default format is 3",
    "bevctl.storage.base.x__create_remote__mutmut_28":
        "`mode=\"w\"` dropped (default \"a\"): the prefix is empty there (new, or just removed), so both create "
        "the same group",
    "bevctl.storage.base.x__create_remote__mutmut_29": "the same as mutant 25 (zarr_format dropped)",
    "bevctl.storage.base.x__create_remote__mutmut_35":
        "the key inside the creating marker renamed: only the marker's presence is ever read (is_incomplete, "
        "SampleStore), never its content",
    "bevctl.storage.base.x__create_remote__mutmut_36": "the same as mutant 35",
    "bevctl.storage.base.x_is_incomplete__mutmut_15":
        "`meta.get(\"attributes\", {})` -> default None: a zarr.json without attributes gives False either way "
        "(None is not a dict)",
    "bevctl.storage.base.x_is_incomplete__mutmut_17": "the same as mutant 15 (default dropped)",
    "bevctl.storage.base.xǁSampleStoreǁcheck_arrays__mutmut_13":
        "`kind in \"TU\"` -> `in \"XXTUXX\"`: a numpy dtype kind is one letter, and no kind is 'X'",
    "bevctl.storage.base.xǁSampleStoreǁcheck_arrays__mutmut_17": "the same as mutant 13",
    "bevctl.storage.base.xǁSampleStoreǁcheck_metadata__mutmut_17":
        "`_first_difference(..., \"\")` -> `None` as the key prefix: both are false, so top-level keys are named "
        "without a prefix either way",
    "bevctl.storage.base.xǁSampleStoreǁconsolidate__mutmut_6": "the same as _create_remote mutant 25 (zarr_format None)",
    "bevctl.storage.base.xǁSampleStoreǁconsolidate__mutmut_8": "the same as _create_remote mutant 25 (zarr_format dropped)",
    "bevctl.storage.base.xǁCompletionLogǁtick__mutmut_2":
        "`> every_s` -> `>=`: differs only when exactly every_s seconds passed on the monotonic clock",
    "bevctl.storage.base.x__short__mutmut_4":
        "`json.dumps(value, sort_keys=True)` -> sort_keys None: every quoted value already went through _jsonable "
        "(a sorted JSON round trip) when the store was made or the expectation checked, so its dicts are in key order",
    "bevctl.storage.base.x__short__mutmut_6": "the same as mutant 4 (sort_keys dropped)",
    "bevctl.storage.base.x__short__mutmut_7": "the same as mutant 4 (sort_keys=False)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_13": "`exterior_cw=False` dropped: shapely's default",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_15": "the same as _bands mutant 18 (np.array of polygons, dtype None)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_17": "the same as _bands mutant 18 (dtype argument dropped)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_18":
        "every ring oriented the other way (exteriors clockwise, holes counter-clockwise): every winding number "
        "changes sign, and the fill tests winding != 0",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_64":
        "the first row not clipped at nx: ceil(lo) > nx only for an edge entirely past the last row, whose "
        "count max(r1 - r0, 0) is 0 either way (r1 is clipped at nx)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_73":
        "the last row not clipped at 0: ceil(hi) < 0 only for an edge entirely before the first row, whose count "
        "max(r1 - r0, 0) is 0 either way (r0 >= 0)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_88":
        "`counts > 0` -> `>= 0`: edges crossing no row are kept but repeated 0 times, so they add no crossing "
        "(and with no crossing at all the winding array stays zero: an empty mask either way)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_122":
        "the +-1 crossing signs left float64 (`astype(None)`) instead of int32: np.add.at adds them into the int32 "
        "winding array exactly",
    "bevctl.data.bev_gt.x_cell_T_global__mutmut_3":
        "`np.asarray(global_T_ego, dtype=np.float64)` -> dtype None: poses are float64 (SampleRecord.global_T_ego), "
        "where the cast is a no-op (a float32 pose at 2 km changed no cell of 6545 divider cells either)",
    "bevctl.data.bev_gt.x_cell_T_global__mutmut_5": "the same as mutant 3 (dtype argument dropped)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_129":
        "`u1 > u0` -> `>=` for the crossing sign: an edge with u1 == u0 crosses no row (count 0), so its sign is "
        "never used",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_145":
        "the winding array float64 instead of int32: sums of +-1 are exact either way, and only `!= 0` is read",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_147": "the same as mutant 145 (dtype argument dropped)",
    "bevctl.data.bev_gt.x_fill_polygons__mutmut_149":
        "one more spare winding column (ny + 2): crossings start at column <= ny and only columns < ny are summed",
    "bevctl.data.bev_gt.x__polygon_parts__mutmut_2":
        "`g is None or g.is_empty` -> `and`: None is skipped anyway (neither a Polygon nor with .geoms), and an "
        "empty Polygon kept as a part has no rings (no edges to fill) and unions to nothing",
    "bevctl.storage.base.x__create_local__mutmut_12":
        "a 9- instead of 8-hex-digit random suffix of the temp folder's name: only its uniqueness matters",
    "bevctl.storage.base.x__create_local__mutmut_33": "the same as mutant 12, for the old store's trash folder",
    "bevctl.storage.base.x__create_local__mutmut_16":
        "`zarr_format=3` -> None: zarr's default format is 3 (`zarr.config` default_zarr_format)",
    "bevctl.storage.base.x__create_local__mutmut_18":
        "mode 'w' -> zarr's default 'a' on a temp folder that does not exist yet (a fresh random name): both "
        "create the same empty group",
    "bevctl.storage.base.x__create_local__mutmut_19": "`zarr_format=3` dropped: the default (mutant 16)",
    "bevctl.storage.base.x__create_local__mutmut_39": _RMTREE,
    "bevctl.storage.base.x__create_local__mutmut_41": _RMTREE,
    "bevctl.storage.base.x__create_local__mutmut_42": _RMTREE,
    "bevctl.storage.base.x__create_local__mutmut_48": _RMTREE,
    "bevctl.storage.base.x__create_local__mutmut_50": _RMTREE,
    "bevctl.storage.base.x__create_local__mutmut_51": _RMTREE,
    "bevctl.storage.base.x__fill__mutmut_7":
        "chunk length at least 2 instead of 1: differs only for a one-sample store, whose tokens/done chunk "
        "is then 2 long with 1 element: the same single object, the same values read back",
    "bevctl.storage.base.x__fill__mutmut_30":
        "the tokens written from a numpy unicode array instead of an object array: zarr stores the same "
        "variable-length strings either way",
    "bevctl.storage.base.x__fill__mutmut_32": "`dtype=object` dropped: as mutant 30",
    "bevctl.storage.base.x__fill__mutmut_37":
        "`done`'s fill value TODO -> None: zarr's default fill value for uint8 is 0, which is TODO, so a "
        "missing `done` chunk still reads as all todo",
    "bevctl.storage.base.x__fill__mutmut_43": "`fill_value=TODO` dropped: as mutant 37",
    "bevctl.storage.base.xǁCompletionLogǁ__init____mutmut_1":
        "the default flush interval 2 s instead of 1 s: every caller (pseudolabel, prepare-gt, predict) "
        "passes `every_s` itself",
    "bevctl.storage.base.xǁSampleStoreǁmark__mutmut_5":
        "`dtype=np.int64` -> None for the indices: callers pass Python or numpy ints, which numpy reads as "
        "int64 anyway, and an empty list returns before it is used as an index",
    "bevctl.storage.base.xǁSampleStoreǁmark__mutmut_7": "`dtype=np.int64` dropped: as mutant 5",
    "bevctl.storage.base.xǁSampleStoreǁmark__mutmut_16":
        "`dtype=np.uint8` -> None when reading `done`: the array is uint8, so the read is uint8 already",
    "bevctl.storage.base.xǁSampleStoreǁmark__mutmut_18": "`dtype=np.uint8` dropped: as mutant 16",
    "bevctl.train.model.encoder.x_visible_query_index__mutmut_4":
        "K = None on the meta device: `[..., :None]` takes every query, the same as `[..., :Q]`",
    "bevctl.train.model.encoder.x_visible_query_index__mutmut_21": "`dim=-1` dropped: torch.argsort's default",
    "bevctl.train.model.encoder.x_visible_query_index__mutmut_22":
        "`stable=True` dropped: an unstable sort of 0 (seen) / 1 (unseen) keys still puts every visible query "
        "before the padding; their order inside the first K only permutes rows that are scattered back to "
        "their own query, so the attention's output is the same",
    "bevctl.train.model.encoder.x_visible_query_index__mutmut_23":
        "`.to(torch.int8)` -> `.to(None)` (a no-op): argsort on the bool mask orders False (seen) before True "
        "exactly as on 0/1",
    "bevctl.train.model.encoder.x_visible_query_index__mutmut_27": "`stable=False`: as mutant 22",
    "bevctl.train.model.encoder.xǁSpatialCrossAttentionǁforward__mutmut_44":
        "the softmax's `-1` dropped: `softmax_fp32`'s default dim is -1",
    "bevctl.train.model.encoder.xǁSpatialCrossAttentionǁforward__mutmut_140":
        "the dense branch's `offsets.unsqueeze(1)` -> `unsqueeze(2)`: a size-1 axis does not move any element, "
        "and the next use is `.view(b, -1, k, ...)`, which reads the same memory either way",
    "bevctl.train.model.encoder.xǁSpatialCrossAttentionǁforward__mutmut_142": "the same as mutant 140 for `weights`",
    "bevctl.storage.base.xǁSampleStoreǁcreate__mutmut_73":
        "reopening the store just created with `zarr_format=None`: zarr detects the format, and the store was "
        "just written as v3",
    "bevctl.storage.base.xǁSampleStoreǁcreate__mutmut_76": "`zarr_format=3` dropped: as mutant 73",
    "bevctl.storage.base.xǁSampleStoreǁcreate__mutmut_75":
        "mode 'r+' -> zarr's default 'a' when reopening the store just created: both open the existing group "
        "read-write",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_5":
        "the early `location.check(path)` skipped (None counts as local): the next line's `location.is_file` "
        "runs the same check on a URL with the same one-line error",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_19":
        "`zarr_format=None` (detect): the line before requires a `zarr.json`, which only a v3 group has (v2 "
        "groups have `.zgroup`), so the detected format is 3",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_22": "`zarr_format=3` dropped: as mutant 19",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_24":
        "the store object opened writable for mode 'r': `zarr.open_group(..., mode='r')` still refuses every "
        "write ('store was opened in read-only mode'), checked by hand",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_26": "`read_only` dropped: as mutant 24",
    "bevctl.storage.base.xǁSampleStoreǁstatus__mutmut_2":
        "`dtype=np.uint8` -> None when reading `done`: the array is uint8, so the read is uint8 already",
    "bevctl.storage.base.xǁSampleStoreǁstatus__mutmut_4": "`dtype=np.uint8` dropped: as mutant 2",
    "bevctl.train.model.encoder.xǁSpatialCrossAttentionǁforward__mutmut_324":
        "the camera average not cast back to the query's dtype: in float32 the cast is a no-op, and under "
        "autocast (bevctl's only reduced precision) `output_proj` casts its input to the same bf16/fp16 itself",
    "bevctl.storage.base.x__jsonable__mutmut_3":
        "metadata normalised without sorting its keys: only the key order inside zarr.json changes; dicts "
        "compare equal in any order and `_first_difference` walks the keys sorted",
    "bevctl.storage.base.x__jsonable__mutmut_5": "`sort_keys=True` dropped: as mutant 3",
    "bevctl.train.model.encoder.xǁEncoderLayerǁ__init____mutmut_1":
        "the layer's default `sca_gather=False`: its only caller (BEVEncoder, from the model config) passes it",
    "bevctl.train.model.encoder.xǁBEVEncoderǁ__init____mutmut_1":
        "the encoder's default `grad_checkpoint=True`: its only caller (BEVFormer, from the model config) passes it",
    "bevctl.train.model.encoder.xǁSpatialCrossAttentionǁ__init____mutmut_1":
        "the default `gather=False`: the model's only caller (EncoderLayer) passes it, and both forms give the "
        "same values (test_gathered_cross_attention_equals_dense)",
    "bevctl.train.model.encoder.xǁFFNǁ__init____mutmut_17": "`ReLU(inplace=False)`: as mutant 16",
    "bevctl.train.model.encoder.xǁFFNǁ__init____mutmut_16":
        "`ReLU(inplace=None)`: out of place; the same values (the pre-activation is not used again)",
    "bevctl.train.model.encoder.xǁTemporalSelfAttentionǁforward__mutmut_186":
        "the sampled values not cast back to the query's dtype: as cross-attention mutant 324",
    "bevctl.storage.base.x__jsonable__mutmut_6": "`sort_keys=False`: as mutant 3",
    "bevctl.train.model.encoder.xǁTemporalSelfAttentionǁforward__mutmut_125":
        "`ref.view(1, q, 1, 1, 1, 2)` -> `ref.view(q, 1, 1, 1, 2)`: broadcasting against the 6-d offsets "
        "prepends the same leading 1",
    "bevctl.train.model.encoder.xǁTemporalSelfAttentionǁforward__mutmut_141":
        "the softmax's `-1` dropped: `softmax_fp32`'s default dim is -1",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_28": "`read_only` always False: as mutant 24",
    "bevctl.storage.base.xǁSampleStoreǁopen__mutmut_29": "`read_only` always False: as mutant 24",
    "bevctl.storage.base.xǁSampleStoreǁcreate__mutmut_4":
        "the early `location.check(target)` skipped (None counts as local): a URL goes to `_create_remote`, whose "
        "`location.exists(url)` runs the same check with the same one-line error (a bad URL given with bad "
        "arrays as well then reports the arrays first)",
    "bevctl.storage.base.xǁSampleStoreǁcreate__mutmut_46":
        "the kind in the `bevctl_creating` marker of a store being built on object storage None: the marker's "
        "content is only for a person reading the bucket; bevctl reads the marker's presence, and a finished "
        "store's kind from its `bevctl` attributes",
    "bevctl.storage.base.xǁSampleStoreǁopen_or_create__mutmut_4":
        "the early `location.check(path)` skipped (None counts as local): the next line's "
        "`location.exists(path)` runs the same check on a URL and raises the same one-line error",
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", None: "not checked"}


def mutmut_section(module: Module) -> str:
    tests = ", ".join(json.dumps(t) for t in module.tests)
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["bevctl"]\n'
        f'only_mutate = ["{module.source}"]\n'
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-x", "-q"]\n'
        'process_isolation = "forkserver"\n'  # torch is not fork-safe after it ran the stats
        # a mutant's wall-clock limit is (test time + constant) x 15: with the default constant of
        # 1 s, a fork + pytest start on a loaded machine timed out mutants of instant tests
        "timeout_constant = 10.0\n"
        "use_git_change_detection = false\n"
    )


def sync_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` into ``dst``, touching only files whose content changed (mtimes kept, so
    mutmut sees unchanged sources as unchanged)."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            s, d = Path(dirpath) / name, dst / rel / name
            if not d.exists() or not filecmp.cmp(s, d, shallow=False):
                shutil.copy2(s, d)


def prepare(module: Module, fresh: bool) -> Path:
    work = WORK / module.name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    sync_tree(ROOT / "bevctl", work / "bevctl")
    sync_tree(ROOT / "tests", work / "tests")
    text = (ROOT / "pyproject.toml").read_text() + mutmut_section(module)
    if not (work / "pyproject.toml").exists() or (work / "pyproject.toml").read_text() != text:
        (work / "pyproject.toml").write_text(text)
    return work


def mutmut_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the tests must import mutants/bevctl, not this checkout
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_planted_mutant(module: Module, work: Path) -> None:
    """The tests of this work directory must import the mutated copy: a module that raises on
    import there must make the module's tests fail."""
    probe = work / "probe"
    if probe.exists():
        shutil.rmtree(probe)
    sync_tree(work / "bevctl", probe / "bevctl")
    sync_tree(work / "tests", probe / "tests")
    shutil.copy2(ROOT / "pyproject.toml", probe / "pyproject.toml")
    target = probe / module.source
    target.write_text('raise RuntimeError("planted mutant")\n' + target.read_text())
    env = mutmut_env()
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(probe)!r}); import pytest; "
           f"sys.exit(pytest.main(['-q', '-x', '-m', 'not slow', '-p', 'no:cacheprovider', *{list(module.tests)!r}]))"]
    rc = subprocess.run(cmd, cwd=probe, env=env, capture_output=True, text=True).returncode
    shutil.rmtree(probe)
    if rc == 0:
        sys.exit(f"error: {module.name}: the tests passed with a planted mutant: they do not import the copy")


def run_module(module: Module, max_children: int, fresh: bool, budget_s: float | None = None,
               recheck_only: bool = False, recheck_equivalent: bool = False) -> float:
    """mutmut run on the mutants without a result, then again on the earlier survivors and
    untested ones (tests may have been added since: mutmut keeps a verdict unless the mutant is
    named); the ones judged equivalent too with ``recheck_equivalent`` (each costs a full run of
    its tests, and a test that kills one only makes its entry in EQUIVALENT unused)."""
    work = prepare(module, fresh)
    check_planted_mutant(module, work)
    earlier = module_results(module)
    survivors = []
    if earlier:
        survivors = earlier["survived"] + earlier["no_tests"] + (list(earlier["equivalent"]) if recheck_equivalent else [])
    start = time.perf_counter()
    print(f"== {module.name}: mutmut run in {work}", flush=True)
    cmd = [str(MUTMUT), "run", "--max-children", str(max_children)]
    passes = ([], survivors) if survivors else ([],)
    if recheck_only:
        passes = (survivors,) if survivors else ()
    for names in passes:
        left = None if budget_s is None else budget_s - (time.perf_counter() - start)
        if left is not None and left <= 0:
            break
        # its own process group, so a spent budget stops mutmut and its workers together; every
        # finished mutant's result is already saved, the next run goes on from there
        proc = subprocess.Popen(cmd + names, cwd=work, env=mutmut_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            print(f"{module.name}: time budget spent, stopping (resume with the same command)", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            break
        if rc != 0:
            print(f"warning: {module.name}: mutmut exited {rc}", flush=True)
    seconds = time.perf_counter() - start
    with open(work / "runs.jsonl", "a") as f:  # every run's wall time: the report sums them
        f.write(json.dumps({"ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 1),
                            "rerun": len(survivors)}) + "\n")
    return seconds


def total_seconds(module: Module) -> float | None:
    runs = WORK / module.name / "runs.jsonl"
    if not runs.exists():
        return None
    return sum(json.loads(line)["seconds"] for line in runs.read_text().splitlines() if line.strip())


def module_results(module: Module) -> dict | None:
    meta = WORK / module.name / "mutants" / (module.source + ".meta")
    if not meta.exists():
        return None
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    survived = sorted(n for n, s in statuses.items() if s == "survived")
    equivalent = {n: EQUIVALENT[n] for n in survived if n in EQUIVALENT}
    counts = {s: sum(1 for v in statuses.values() if v == s) for s in set(STATUS.values()) | {"suspicious"}}
    counts = {k: v for k, v in counts.items() if v}
    checked = sum(v for k, v in counts.items() if k != "not checked")
    killable = checked - len(equivalent)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"module": module.name, "source": module.source, "tests": list(module.tests), "mutants": len(codes),
            "counts": counts, "equivalent": equivalent,
            "survived": [n for n in survived if n not in equivalent],
            "no_tests": sorted(n for n, s in statuses.items() if s == "no tests"),
            "score": round(killed / killable, 4) if killable else None}


def write_report() -> None:
    path_json = RESULTS / "mutation.json"
    rows = []
    for m in MODULES:
        r = module_results(m)
        if r is None:
            continue
        r["seconds"] = total_seconds(m)
        rows.append(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path_json.write_text(json.dumps({"tool": "mutmut", "modules": rows}, indent=2) + "\n")
    lines = ["# Mutation testing of the core (mutmut)", "",
             "`make mutants` (= `nice -n 19 python bench/mutation.py`; `MODULES=\"evaluate geometry\"` for some) runs "
             "mutmut 3.8.1 on one core module at a time, against that module's fast tests (the `tests` column; "
             "mutmut runs, per mutant, the ones that executed the mutated function). Resumable; not in CI.", "",
             "- killed: a test failed (timeouts counted apart, and as killed in the score);",
             "- survived: every test passed, and the mutant is not judged equivalent (listed below);",
             "- equivalent: survived, and no behaviour can tell it from the original (reason below);",
             "- no tests: no selected test executes the function;",
             "- not checked: not run yet (the run was stopped for lack of time);",
             "- score = killed / (checked - equivalent), checked = all but not checked.", "",
             "mutmut 3 does not mutate decorated functions (`@torch.no_grad()` `evaluate()` and "
             "`prediction_stats()`, `@functools.cache` `shipped_label_maps()`, properties), nor module-level "
             "constants. Time: wall time of all `mutmut run`s of the module (resumed runs added up), under "
             "`nice -n 19` on a 2-core machine shared with other jobs (tests, benchmarks, a demo run; load average 3-15): an idle machine "
             "is several times faster.", "",
             "| module | tests | mutants | killed | timeout | survived | equivalent | no tests | not checked | score | time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["counts"]
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}%"
        secs = "" if r["seconds"] is None else f"{r['seconds'] / 60:.0f} min"
        tests = " ".join(Path(t).name if t.startswith("tests/") else f"`{t}`" for t in r["tests"])
        lines.append(f"| `{r['source']}` | {tests} | {r['mutants']} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
                     f"{len(r['survived'])} | {len(r['equivalent'])} | {c.get('no tests', 0)} | "
                     f"{c.get('not checked', 0)} | {score} | {secs} |")
    missing = [m for m in MODULES if m.name not in {r["module"] for r in rows}]
    if missing:
        lines += ["", "Not run yet (lack of time): " + ", ".join(f"`{m.source}`" for m in missing) + "."]
    for r in rows:
        if r["equivalent"] or r["survived"] or r["no_tests"]:
            lines += ["", f"## {r['module']}", ""]
            for n, why in r["equivalent"].items():
                lines.append(f"- `{n}`: equivalent: {why}")
            for n in r["survived"]:
                lines.append(f"- `{n}`: survived")
            for n in r["no_tests"]:
                lines.append(f"- `{n}`: no tests")
    (RESULTS / "mutation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path_json} and {RESULTS / 'mutation.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="+", choices=list(BY_NAME), default=[m.name for m in MODULES])
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results of these modules")
    ap.add_argument("--minutes", type=float, help="time budget per module (stops it there; rerun to go on)")
    ap.add_argument("--recheck", action="store_true",
                    help="only rerun the earlier survivors and untested mutants (after adding tests)")
    ap.add_argument("--recheck-equivalent", action="store_true",
                    help="rerun the mutants judged equivalent as well (each costs a full run of its tests)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from earlier results")
    args = ap.parse_args()
    if not MUTMUT.exists():
        sys.exit(f"error: {MUTMUT} not found: install the dev extra (pip install -e '.[dev]')")
    try:
        if not args.report_only:
            for name in args.modules:
                run_module(BY_NAME[name], args.max_children, args.fresh,
                           None if args.minutes is None else 60 * args.minutes, args.recheck, args.recheck_equivalent)
                write_report()
    finally:
        write_report()


if __name__ == "__main__":
    main()

"""BEVFormer for BEV segmentation in pure PyTorch (no mmcv): presets from CPU demo to paper size.

Interface (the trainer relies on it; keep it stable)::

    from bevctl.train.model import BEVFormer, model_preset
    cfg = model_preset("demo")           # ModelConfig; override with dataclasses.replace or
                                         # model_config_from_dict({"preset": "tiny", ...}) from YAML
    model = BEVFormer(cfg, grid, num_classes)   # grid: BEVGrid (target), num_classes incl. background
    out = model(images,        # (B, N, 3, H, W) uint8 RGB (the model normalises it) or float
                               # already normalised; (H, W) = cfg.image_hw
                pix_T_cam,     # (B, N, 3, 3) intrinsics already scaled to (H, W)
                ego_T_cam,     # (B, N, 4, 4) camera (optical frame) -> ego
                prev_bev=None, # (B, D, Xq, Yq) previous frame's out.bev (or None)
                cur_T_prev=None)  # (B, 4, 4) previous ego frame -> current ego frame
    out.logits   # (B, num_classes, X, Y) on `grid`
    out.bev      # (B, D, Xq, Yq) on model.query_grid = grid.coarsened(cfg.bev_downsample)

``cur_T_prev`` is ``inv(global_T_ego[t]) @ global_T_ego[t-1]``. The previous BEV is resampled
into the current ego frame exactly (full rigid transform, :func:`align_prev_bev`); cells it does
not cover take the current queries instead. Cameras are in ``bevctl.data.records.CAMERAS``
order (each has its own learned embedding). Helpers: :func:`compile_model` (``torch.compile``),
:func:`save_model` / :func:`load_model` (atomic, ``weights_only=True``), :func:`count_parameters`.

Under AMP, attention softmaxes, sampling positions and the deformable sampling itself run in
float32.
"""

from bevctl.train.model.bevformer import (
    BEVFormer,
    BEVFormerOutput,
    align_prev_bev,
    compile_model,
    count_parameters,
    load_model,
    save_model,
)
from bevctl.train.model.config import (
    MODEL_PRESETS,
    ModelConfig,
    model_config_from_dict,
    model_preset,
    resolve_model_config,
)

__all__ = [
    "BEVFormer",
    "BEVFormerOutput",
    "MODEL_PRESETS",
    "ModelConfig",
    "align_prev_bev",
    "compile_model",
    "count_parameters",
    "load_model",
    "model_config_from_dict",
    "model_preset",
    "resolve_model_config",
    "save_model",
]

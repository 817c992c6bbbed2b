"""CUDA against CPU: the GPU paths compute what the tested CPU paths compute.

Marked ``gpu`` and skipped without CUDA (CI has none); ``bench/gpu_check.py`` runs them on the
GPU machine (``pytest -m gpu``). Tolerances, with fp32 on both sides (TF32 off):

- deformable attention and the losses: 1e-4 relative. The same float32 math; only the order of
  additions differs (CUDA's atomic adds in ``grid_sample``'s backward, parallel reductions),
  which moves results by ~1e-6 relative at these sizes.
- a training step through the real loop: per-step losses 1e-3 relative (the first step's loss is
  the same forward; the second sees weights that differ where AdamW's normalised update flips on
  gradients near zero); with bf16 autocast on the GPU 3% (bevctl/bench gpu_check AMP_LOSS_RTOL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bevctl.config import GRID_PRESETS
from bevctl.data.rig import reference_rig
from bevctl.train import losses
from bevctl.train.checkpoint import load_checkpoint
from bevctl.train.config import TrainConfig
from bevctl.train.loop import RunSpec, train
from bevctl.train.model.attention import ms_deform_attn
from bevctl.train.toy import toy_dataset_factory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
GRID = GRID_PRESETS["demo"]
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Full fp32 on the GPU (no TF32 in matmuls or convolutions) for like-for-like comparisons."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _close(gpu: torch.Tensor, cpu: torch.Tensor, rtol: float = RTOL) -> None:
    """Max abs difference within rtol of the CPU tensor's largest magnitude."""
    scale = float(cpu.detach().abs().max()) or 1.0
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=0, atol=rtol * scale)


def _rig(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ks, ts = reference_rig((h, w))
    return torch.from_numpy(ks).float()[None], torch.from_numpy(ts).float()[None]


def test_deformable_attention_forward_and_backward_equal_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    b, q, m, dh, p = 2, 500, 8, 32, 4
    shapes = [(45, 80), (23, 40), (12, 20), (6, 10)]
    values = [torch.randn(b, m, dh, h, w, generator=g) for h, w in shapes]
    loc = torch.rand(b, q, m, len(shapes), p, 2, generator=g) * 1.2 - 0.1  # some outside the maps
    weights = torch.rand(b, q, m, len(shapes), p, generator=g).softmax(-1)
    out_grad = torch.randn(b, q, m * dh, generator=g)

    def run(device: str, autocast: bool) -> tuple[torch.Tensor, ...]:
        vs = [v.to(device).requires_grad_(True) for v in values]
        lc = loc.to(device).requires_grad_(True)
        wt = weights.to(device).requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = ms_deform_attn(vs, lc, wt)
        (out * out_grad.to(device)).sum().backward()
        return out, lc.grad, wt.grad, *[v.grad for v in vs]

    cpu = run("cpu", False)
    for autocast in (False, True):  # the op runs in fp32 whatever the autocast state
        gpu = run("cuda", autocast)
        assert gpu[0].dtype == torch.float32
        for a, c in zip(gpu, cpu):
            _close(a, c)


def test_reprojection_and_temporal_losses_equal_cpu() -> None:
    image_hw, label_hw = (90, 160), (45, 80)
    pix, ego = _rig(*image_hw)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, *GRID.shape, generator=g)
    prev = torch.randn(1, 4, *GRID.shape, generator=g)
    labels = torch.randint(0, 4, (1, 6, *label_hw), generator=g, dtype=torch.uint8)
    labels[:, :, : label_hw[0] // 3] = 255  # above the horizon: ignored
    conf = torch.randint(0, 256, (1, 6, *label_hw), generator=g, dtype=torch.uint8)
    g_prev = torch.eye(4)[None].clone()
    g_cur = torch.eye(4)[None].clone()
    g_cur[0, 0, 3], g_cur[0, 1, 3] = 1.7, 0.4  # moved forward and left
    c, s = np.cos(0.05), np.sin(0.05)
    g_cur[0, :2, :2] = torch.tensor([[c, -s], [s, c]])

    def run(device: str) -> tuple[torch.Tensor, ...]:
        x = logits.to(device).requires_grad_(True)
        rays = losses.RayGridCache(GRID).batch(pix.to(device), ego.to(device), label_hw, image_hw)
        rep, _ = losses.reprojection_loss(x, labels.to(device), rays, GRID, confidence=conf.to(device),
                                          min_confidence=0.3, class_weights=torch.tensor([1.0, 8, 3, 8], device=device))
        tmp, _ = losses.temporal_loss(x, prev.to(device), g_cur.to(device), g_prev.to(device), GRID)
        (rep + tmp).backward()
        return rep, tmp, x.grad

    cpu, gpu = run("cpu"), run("cuda")
    assert float(cpu[0]) > 0 and float(cpu[1]) > 0
    for a, b in zip(gpu, cpu):
        _close(a, b)


def _cfg(**kw) -> TrainConfig:
    base = dict(model="demo", grid="demo", image_hw=(48, 80), batch_size=2, epochs=5, max_steps=3, lr=1e-3,
                warmup_steps=10, checkpoint_every=3, num_workers=1, temporal_weight=0.1, seed=0, amp="off")
    base.update(kw)
    return TrainConfig(**base)


def _run(tmp: Path, name: str, device: str, **kw) -> Path:
    spec = RunSpec(mode="pretrain", cfg=_cfg(**kw), run_dir=tmp / name, device=device, progress=False,
                   dataset_factory=toy_dataset_factory, extra={"n": 8, "label_hw": (24, 40)})
    return Path(train(spec))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_steps_through_the_loop_equal_cpu(tmp_path: Path) -> None:
    cpu = _run(tmp_path, "cpu", "cpu")
    gpu = _run(tmp_path, "gpu", "cuda")  # pinned memory, non_blocking copies, CUDA kernels
    amp = _run(tmp_path, "amp", "cuda", amp="auto")  # bf16 autocast (fp16 + GradScaler without bf16)
    ref = _losses(cpu.parent)
    np.testing.assert_allclose(_losses(gpu.parent), ref, rtol=1e-3)
    np.testing.assert_allclose(_losses(amp.parent), ref, rtol=0.03)
    w_cpu, w_gpu = load_checkpoint(cpu)["model"], load_checkpoint(gpu)["model"]
    lr = _cfg().lr
    for name, w in w_cpu.items():  # each AdamW step moves a weight by at most ~lr
        if w.is_floating_point():
            assert float((w_gpu[name] - w).abs().max()) <= 3 * lr, name


def test_checkpoint_written_on_the_gpu_loads_on_a_cpu_machine(tmp_path: Path) -> None:
    last = _run(tmp_path, "gpu", "cuda", max_steps=1, checkpoint_every=1)
    ckpt = load_checkpoint(last)  # map_location="cpu"
    tensors = [t for t in ckpt["model"].values() if torch.is_tensor(t)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    # a process that sees no GPU at all, as on a CPU machine
    code = ("import sys, torch; from bevctl.train.evaluate import load_trained_model; "
            "assert not torch.cuda.is_available(); "
            "m, cfg, _ = load_trained_model(sys.argv[1], torch.device('cpu')); "
            "print(repr(sum(float(t.double().sum()) for t in m.state_dict().values() if t.is_floating_point())))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, str(last)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = sum(float(t.double().sum()) for t in tensors if t.is_floating_point())
    assert float(proc.stdout.split()[-1]) == pytest.approx(want, rel=1e-12)  # the weights written on the GPU


def test_shipped_labeler_on_the_gpu_in_half_precision_agrees_with_cpu() -> None:
    from bevctl.pseudolabel.labeler import load_labeler

    gpu = load_labeler("bevctl-synth", device="auto")
    assert str(gpu.device).startswith("cuda") and gpu.dtype in (torch.bfloat16, torch.float16)
    cpu = load_labeler("bevctl-synth", device="cpu")
    rng = np.random.default_rng(0)
    image = np.zeros((90, 160, 3), dtype=np.uint8)
    image[45:] = (90, 90, 90)  # a road below the horizon with a painted stripe
    image[60:, 75:85] = (240, 240, 240)
    image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
    pre = cpu.preprocess(image)
    lab_gpu, conf_gpu = gpu.predict([pre], (90, 160), True)
    lab_cpu, conf_cpu = cpu.predict([pre], (90, 160), True)
    assert lab_gpu.dtype == np.uint8 and lab_gpu.shape == (1, 90, 160)
    assert float((lab_gpu == lab_cpu).mean()) > 0.97  # half precision flips only near-ties

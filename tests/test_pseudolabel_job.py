"""The pseudo-label job on the synthetic world with stand-in labelers: exactly-once writes,
resume, actor crashes, bad images, incompatible stores, kill -9 of the driver, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevctl.data.nuscenes import load_index
from bevctl.errors import BevctlError
from bevctl.pseudolabel import job as job_mod
from bevctl.pseudolabel.job import PseudolabelConfig, run_pseudolabel
from bevctl.pseudolabel.standins import gt_path_for_image
from bevctl.storage.labels import LabelStore


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "cache"))


def _cfg(root: Path, version: str, out: Path, **kw) -> PseudolabelConfig:
    base = dict(dataroot=str(root), version=version, out=str(out), model="synth-gt", workers=0,
                batch_size=4, progress=False)
    base.update(kw)
    return PseudolabelConfig(**base)


def _expected(root: Path, version: str, out_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Every sample's six GT masks, resized (nearest) to ``out_hw``: what synth-gt must store."""
    index = load_index(root, version)
    result = {}
    for s in index.all_samples():
        masks = []
        for cam in s.cameras:
            gt = Image.open(gt_path_for_image(cam.image_path))
            if out_hw is not None:
                gt = gt.resize((out_hw[1], out_hw[0]), Image.Resampling.NEAREST)
            masks.append(np.asarray(gt, dtype=np.uint8))
        result[s.token] = np.stack(masks)
    return result


def _assert_store_equals(out: Path, expected: dict[str, np.ndarray]) -> None:
    store = LabelStore.open(out)
    assert sorted(store.tokens) == sorted(expected)
    for token, want in expected.items():
        assert store.status(token) == "done"
        np.testing.assert_array_equal(store.get(token), want, err_msg=token)


def test_every_image_labeled_once_then_resume_skips(tiny_synth, tmp_path, monkeypatch) -> None:
    root, version = tiny_synth
    first = next(iter(load_index(root, version).all_samples())).cameras[0]
    out_hw = (first.height // 2, first.width // 2)
    calls: list[tuple[int, int]] = []
    real_label = job_mod.LabelWorker.label

    def counting_label(self, store_path, confidence, hw, items):
        calls.extend((i, c) for i, c, _ in items)
        return real_label(self, store_path, confidence, hw, items)

    monkeypatch.setattr(job_mod.LabelWorker, "label", counting_label)
    out = tmp_path / "labels.zarr"
    summary = run_pseudolabel(_cfg(root, version, out, resolution=out_hw, confidence=True))
    n = summary.samples_total
    assert n >= 2 and summary.samples_done == n and summary.samples_failed == 0
    assert summary.images_labeled == 6 * n
    assert sorted(calls) == [(i, c) for i in range(n) for c in range(6)]  # each image exactly once
    expected = _expected(root, version, out_hw)
    _assert_store_equals(out, expected)
    store = LabelStore.open(out)
    assert store.resolution == out_hw and store.model_id == "synth-gt"
    assert store.id2label[2] == "lane_marking" and store.dataroot == str(Path(root).resolve())
    assert (store.get_confidence(store.tokens[0]) == 255).all()
    # every class the oracle sees is a real label: the masks are not trivially constant
    assert len(np.unique(np.concatenate([m.ravel() for m in expected.values()]))) >= 4

    calls.clear()
    again = run_pseudolabel(_cfg(root, version, out, resolution=out_hw, confidence=True))
    assert calls == [] and again.samples_skipped == n and again.images_labeled == 0
    _assert_store_equals(out, expected)


def test_incompatible_store_is_refused(tiny_synth, tmp_path) -> None:
    root, version = tiny_synth
    out = tmp_path / "labels.zarr"
    run_pseudolabel(_cfg(root, version, out, resolution=(32, 64)))
    with pytest.raises(BevctlError, match=r"resolution=\[32, 64\].*--overwrite"):
        run_pseudolabel(_cfg(root, version, out, resolution=(16, 32)))
    with pytest.raises(BevctlError, match=r"model_id=\"synth-gt\".*--overwrite"):
        run_pseudolabel(_cfg(root, version, out, resolution=(32, 64), model="sleep:0"))
    with pytest.raises(BevctlError, match=r"confidence=false"):
        run_pseudolabel(_cfg(root, version, out, resolution=(32, 64), confidence=True))
    summary = run_pseudolabel(_cfg(root, version, out, resolution=(16, 32), overwrite=True))
    assert summary.samples_done == summary.samples_total and summary.samples_skipped == 0
    assert LabelStore.open(out).resolution == (16, 32)


def test_missing_and_corrupt_images(tiny_synth, tmp_path) -> None:
    src, version = tiny_synth
    root = tmp_path / "data"
    shutil.copytree(src, root)
    samples = load_index(root, version).all_samples()
    missing = Path(samples[0].cameras[2].image_path)
    corrupt = Path(samples[-1].cameras[4].image_path)
    backup = {p: p.read_bytes() for p in (missing, corrupt)}
    missing.unlink()
    corrupt.write_bytes(backup[corrupt][: len(backup[corrupt]) // 3])  # a truncated JPEG
    out = tmp_path / "labels.zarr"

    with pytest.raises(BevctlError) as err:  # the first bad image in job order, named
        run_pseudolabel(_cfg(root, version, out))
    msg = str(err.value)
    assert msg.startswith(f"{missing}: missing image") or msg.startswith(f"{corrupt}: corrupt image"), msg

    summary = run_pseudolabel(_cfg(root, version, out, on_error="skip"))
    assert summary.samples_failed == 2 and summary.images_failed == 2
    assert summary.samples_done == summary.samples_total - 2
    assert any(str(missing) in f for f in summary.failures)
    assert any(str(corrupt) in f and "corrupt" in f for f in summary.failures)
    store = LabelStore.open(out)
    assert store.status(samples[0].token) == "failed" and store.status(samples[-1].token) == "failed"
    assert store.status(samples[1].token) == "done"
    with pytest.raises(BevctlError, match="failed, not done"):
        store.get(samples[0].token)  # the trainer skips failed samples

    for p, data in backup.items():  # fixed input: a rerun redoes exactly the failed samples
        p.write_bytes(data)
    rerun = run_pseudolabel(_cfg(root, version, out, on_error="skip"))
    assert rerun.images_labeled == 12 and rerun.samples_failed == 0
    _assert_store_equals(out, _expected(root, version))


def test_ray_actor_crash_is_restarted_and_work_redone(tiny_synth, tmp_path, monkeypatch) -> None:
    root, version = tiny_synth
    marker = tmp_path / "crashed"
    monkeypatch.setenv("BEVCTL_FAULT_MARKER", str(marker))
    out = tmp_path / "labels.zarr"
    summary = run_pseudolabel(_cfg(root, version, out, model="crash-once:2", workers=2, batch_size=3))
    assert marker.is_file(), "the fault-injecting labeler never crashed"
    assert summary.actor_restarts >= 1
    assert summary.samples_done == summary.samples_total
    _assert_store_equals(out, _expected(root, version))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bevctl.cli import main; main()", *args]


def _done_count(out: Path) -> int:
    try:
        return LabelStore.open(out).counts()["done"]
    except BevctlError:
        return 0


@pytest.mark.slow
def test_kill_9_driver_then_rerun_is_bit_identical(tiny_synth, tmp_path) -> None:
    root, version = tiny_synth
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--dataroot", str(root), "--version", version, "--workers", "1", "--batch-size", "3"]
    ref = tmp_path / "ref.zarr"  # an uninterrupted run (in process: same masks, same bytes)
    run_pseudolabel(_cfg(root, version, ref, batch_size=3))

    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(_cli("pseudolabel", *common, "--model", "synth-gt:0.2", "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    n_total = len(LabelStore.open(ref))
    while time.monotonic() < deadline and proc.poll() is None and _done_count(out) < 1:
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    time.sleep(0.3)  # let it get some batches further, mid-flight
    proc.send_signal(signal.SIGKILL)  # the driver only: its Ray processes notice and exit
    proc.wait(timeout=30)
    time.sleep(2)
    try:  # Ray's agents can outlive a killed driver: end what this test started
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    partial_done = _done_count(out)
    assert 1 <= partial_done < n_total

    res = subprocess.run(_cli("pseudolabel", *common, "--model", "synth-gt:0.2", "--out", str(out)), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{partial_done} skipped" in res.stdout
    a, b = LabelStore.open(ref), LabelStore.open(out)
    assert b.counts() == {"todo": 0, "done": n_total, "failed": 0}
    for token in a.tokens:
        np.testing.assert_array_equal(a.get(token), b.get(token))
    # the chunk files themselves are byte-identical, and nothing else is lying around
    files_a = {p.relative_to(ref): p for p in (ref / "masks").rglob("*") if p.is_file()}
    files_b = {p.relative_to(out): p for p in (out / "masks").rglob("*") if p.is_file()}
    assert files_a.keys() == files_b.keys()
    assert all(files_a[k].read_bytes() == files_b[k].read_bytes() for k in files_a)
    assert (ref / "done" / "c" / "0").read_bytes() == (out / "done" / "c" / "0").read_bytes()


def test_cli_stats_show_and_errors(tiny_synth, tmp_path) -> None:
    from typer.testing import CliRunner

    from bevctl.cli import app

    root, version = tiny_synth
    out = tmp_path / "labels.zarr"
    run_pseudolabel(_cfg(root, version, out, resolution=(40, 72)))
    runner = CliRunner()
    res = runner.invoke(app, ["labels", "stats", str(out)])
    assert res.exit_code == 0, res.output
    assert "road" in res.output and "lane_marking" in res.output and "done" in res.output
    png = tmp_path / "show.png"
    token = LabelStore.open(out).tokens[1]
    res = runner.invoke(app, ["labels", "show", str(out), "--sample", token, "--out", str(png)])
    assert res.exit_code == 0, res.output
    with Image.open(png) as im:
        assert im.size[0] == 3 * 72 and im.size[1] > 2 * 40  # 2x3 cameras + a legend strip
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # images with coloured masks, not a blank canvas

    proc = subprocess.run(_cli("pseudolabel", "--dataroot", str(root), "--version", version, "--out",
                               str(out), "--workers", "0", "--model", "synth-gt", "--resolution", "12"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --resolution '12': expected HxW, e.g. 225x400"


def test_labeler_breaking_its_contract_is_one_clear_error(tiny_synth, tmp_path, monkeypatch) -> None:
    from bevctl.pseudolabel.standins import SynthGTLabeler

    root, version = tiny_synth
    real = SynthGTLabeler.predict
    monkeypatch.setattr(SynthGTLabeler, "predict",
                        lambda self, b, hw, c: (real(self, b, hw, c)[0].astype(np.int64), None))
    # batch size 4 rounds up to one whole sample: 6 images
    with pytest.raises(BevctlError, match=r"labeler synth-gt: predict returned labels int64\(6, 45, 80\), "
                                          r"expected uint8\(6, 45, 80\)"):
        run_pseudolabel(_cfg(root, version, tmp_path / "l.zarr", resolution=(45, 80)))


class _FakeCall(job_mod._Done):
    """A call to a :class:`_DyingPool` actor, run when the driver waits for it."""

    def __init__(self, actor: int, life: int, args: tuple) -> None:
        super().__init__()
        self.actor, self.life, self.args, self.ran = actor, life, args, False


class _DyingPool:
    """Two in-process "actors" whose process dies on a batch holding the ``poison`` image (the
    first ``deaths_left`` times); as on Ray, every call the dead process had in flight fails with
    it (``_ActorDied``), and the actor comes back when probed."""

    def __init__(self, cfg: PseudolabelConfig, poison: str, deaths_left: int) -> None:
        self.worker = job_mod.LabelWorker(cfg.model, cfg.device, cfg.threads)
        self.actors = [0, 1]
        self.lives = [0, 0]
        self.poison, self.deaths_left, self.deaths = poison, deaths_left, 0
        self.bystanders: list[int] = []  # per death: other calls the dead process had in flight

    def info(self) -> dict:
        return self.worker.info()

    def submit(self, actor: int, args: tuple) -> _FakeCall:
        return _FakeCall(actor, self.lives[actor], args)

    def probe(self, actor: int) -> job_mod._Done:
        return job_mod._Done(self.worker.info())

    def wait(self, refs: list, timeout: float) -> list:
        call = refs[0]  # the oldest call (the driver lists them in submission order)
        if isinstance(call, _FakeCall) and not call.ran:
            call.ran = True
            if call.life != self.lives[call.actor]:  # its process is gone
                call.error = job_mod._ActorDied("ActorDiedError")
            elif self.deaths_left and any(path == self.poison for *_, path in call.args[3]):
                self.deaths_left -= 1
                self.deaths += 1
                self.bystanders.append(sum(1 for r in refs if isinstance(r, _FakeCall) and r is not call
                                           and (r.actor, r.life) == (call.actor, call.life) and not r.ran))
                self.lives[call.actor] += 1
                call.error = job_mod._ActorDied("ActorDiedError")
            else:
                call.value = self.worker.label(*call.args)
        return [call]

    def close(self) -> None:
        pass


def _store_order(root: Path, version: str) -> list:
    index = load_index(root, version)
    return [s for split in index.split_names() for s in index.samples_in(split)]


def _poison_image(root: Path, version: str) -> str:
    """An image of the job's first batch (three or more batches are in flight then)."""
    return _store_order(root, version)[0].cameras[1].image_path


def test_actor_death_with_batches_in_flight_blames_none_of_them(tiny_synth, tmp_path, monkeypatch) -> None:
    """A batch kills its actor once, with two more batches in flight: all three are redone, each
    alone on an idle actor, nobody is charged, and the store is complete and exact."""
    root, version = tiny_synth
    pools: list[_DyingPool] = []
    monkeypatch.setattr(job_mod, "_InlinePool",
                        lambda cfg: pools.append(_DyingPool(cfg, _poison_image(root, version), 1)) or pools[-1])
    monkeypatch.setattr(job_mod, "MAX_ATTEMPTS", 1)  # any charge would stop the job
    out = tmp_path / "labels.zarr"
    summary = run_pseudolabel(_cfg(root, version, out, batch_size=3))
    assert pools[0].deaths == 1 and pools[0].bystanders[0] >= 1 and summary.actor_restarts == 1
    assert summary.images_labeled == 6 * summary.samples_total  # every image reported once
    _assert_store_equals(out, _expected(root, version))


def test_batch_that_kills_every_actor_stops_the_job_naming_it(tiny_synth, tmp_path, monkeypatch) -> None:
    root, version = tiny_synth
    poison = _poison_image(root, version)
    pools: list[_DyingPool] = []
    monkeypatch.setattr(job_mod, "_InlinePool", lambda cfg: pools.append(_DyingPool(cfg, poison, 99)) or pools[-1])
    out = tmp_path / "labels.zarr"
    with pytest.raises(BevctlError, match=r"labeler actor died 3 times on the batch starting at ") as err:
        run_pseudolabel(_cfg(root, version, out, batch_size=3))
    # the first death had bystanders in flight (no charge); then the batch ran alone 3 times
    assert pools[0].deaths == 4 and pools[0].bystanders[0] >= 1
    assert pools[0].bystanders[1:] == [0, 0, 0]
    first = _store_order(root, version)[0]
    assert str(err.value).endswith(f"at {first.cameras[0].image_path} (ActorDiedError)")  # not a bystander's
    assert LabelStore.open(out).status(first.token) == "todo"


class _RecordingStore:
    """The driver's view of a label store, in memory: records every completion record written,
    and whether each sample marked DONE had all its images reported written at that moment."""

    model_id = "fake"

    def __init__(self, n: int, path: Path, reported: set[tuple[int, int]], n_cams: int) -> None:
        self.path, self.tokens = str(path), [f"s{i}" for i in range(n)]
        self.statuses = np.zeros(n, dtype=np.uint8)
        self.reported, self.n_cams = reported, n_cams
        self.early: list[tuple[int, list[int]]] = []  # (sample, cameras reported written) when marked DONE
        self.marks: list[tuple[int, int]] = []  # (sample, status) in the order written

    def __len__(self) -> int:
        return len(self.tokens)

    def todo_indices(self) -> np.ndarray:
        return np.flatnonzero(self.statuses != 1)

    def mark(self, indices, status: int) -> None:
        for i in indices:
            cams = sorted(c for s, c in self.reported if s == i)
            if status == 1 and len(cams) < self.n_cams:
                self.early.append((int(i), cams))
            self.marks.append((int(i), status))
            self.statuses[i] = status

    def counts(self) -> dict[str, int]:
        return {name: int((self.statuses == code).sum()) for code, name in ((0, "todo"), (1, "done"), (2, "failed"))}

    run_info: dict = {}

    def consolidate(self) -> None:  # the real store writes consolidated metadata at the end
        pass

    def set_run_info(self, info) -> None:
        pass


class _ScriptedPool:
    """An in-process pool whose worker 'writes' every image except those in ``bad``; a batch's
    images count as reported written only once the driver receives that batch's result."""

    def __init__(self, reported: set[tuple[int, int]], bad: set[tuple[int, int]]) -> None:
        self.actors = [0]
        self.reported, self.bad = reported, bad

    def submit(self, actor: int, args: tuple) -> job_mod._Done:
        items = args[3]
        ok = [(i, c) for i, c, _ in items if (i, c) not in self.bad]
        errors = [(i, c, p, "corrupt image") for i, c, p in items if (i, c) in self.bad]
        return job_mod._Done({"ok": ok, "errors": errors})

    def wait(self, refs: list, timeout: float) -> list:
        ref = refs[0]  # results arrive in submission order, one at a time
        self.reported.update(ref.value["ok"])
        return [ref]


def test_sample_is_marked_done_only_after_all_six_images_were_written(tmp_path, monkeypatch) -> None:
    """The completion records are flushed after every result (batches hold whole samples: asked
    for 4 images, the driver sends one sample's 6): no sample may be DONE before its sixth image
    is reported written; a sample with a failed image is FAILED, never DONE."""
    monkeypatch.setattr(job_mod, "MARK_EVERY_S", -1.0)  # flush the completion records at every step
    n, n_cams = 4, 6
    reported: set[tuple[int, int]] = set()
    store = _RecordingStore(n, tmp_path / "labels.zarr", reported, n_cams)
    pool = _ScriptedPool(reported, bad={(2, 5)})  # the last image of sample 2 fails
    paths = [[f"img/{i}/{c}.jpg" for c in range(n_cams)] for i in range(n)]
    cfg = PseudolabelConfig(dataroot="unused", version="v", out=store.path, workers=0, batch_size=4,
                            progress=False, on_error="skip", inflight=1)
    summary = job_mod._drive(cfg, pool, store, paths, (8, 16), n_cams, {"device": "cpu"})
    assert store.early == []  # no sample was DONE before all six of its images were written
    assert sorted(store.marks) == [(0, 1), (1, 1), (2, 2), (3, 1)]  # each sample recorded once
    assert summary.samples_done == 3 and summary.samples_failed == 1 and summary.images_labeled == 23
    # the records go out as soon as each sample completes (not only at the end of the job)
    assert [i for i, _ in store.marks] == [0, 1, 2, 3]

"""Fixtures of the reliability suite (tests/reliability/).

Bad input (test_bad_*.py, test_security.py):

``bevctl_cli``   -> ``run(*args) -> CliResult``: the real ``bevctl`` entry point
                   (:func:`bevctl.cli.main`, which turns a BevctlError into one ``error:`` line
                   and exit 2) run in this process with captured stdout/stderr.
``broken_copy``  -> a private copy of the tiny synthetic dataset to break: ``(root, version)``.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.startswith("error:")]

    def assert_refused(self, *needles: object) -> str:
        """Exit code != 0, exactly one ``error:`` line containing every needle, no traceback.
        Returns the error line."""
        assert self.code not in (0, None), f"exit code {self.code}; output:\n{self.text}"
        lines = self.error_lines()
        assert len(lines) == 1, f"expected one error line, got {lines}; output:\n{self.text}"
        assert "Traceback" not in self.text, self.text
        for needle in needles:
            assert str(needle) in lines[0], f"{needle!r} not named in {lines[0]!r}"
        return lines[0]

    def assert_nothing_written(self, out: Path) -> None:
        """``out`` does not exist and no temp file/dir of a torn write is left beside it."""
        assert not out.exists(), f"{out} was written by a refused command"
        if out.parent.is_dir():
            torn = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]
            assert not torn, f"temp files left beside {out}: {torn}"


@pytest.fixture
def bevctl_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from bevctl.cli import main

    monkeypatch.setenv("BEVCTL_CACHE_DIR", str(tmp_path / "bevctl-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        old = sys.argv
        sys.argv = ["bevctl", *(str(a) for a in args)]
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = old
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def broken_copy(tiny_synth: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    src, version = tiny_synth
    root = tmp_path / "data"
    shutil.copytree(src, root)
    return root, version



@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run of the stand-in ``toy`` model (demo grid, hdmapnet classes):
    ``RUN/last.pt``. Built from the toy dataset factory: no dataset needed (~1 s)."""
    from bevctl.train.config import TrainConfig
    from bevctl.train.loop import RunSpec, train
    from bevctl.train.toy import toy_dataset_factory

    cfg = TrainConfig(model="toy", grid="demo", batch_size=2, epochs=1, max_steps=2, warmup_steps=1,
                      num_workers=0, temporal_weight=0.0)
    run = tmp_path_factory.mktemp("toy_run") / "run"
    return Path(train(RunSpec(mode="pretrain", cfg=cfg, run_dir=run, device="cpu", progress=False,
                         dataset_factory=toy_dataset_factory, extra={"n": 4})))


# ---- Faults (test_faults*.py) ---------------------------------------------------------------------
#
# ``fault_world``  -> faultkit.FaultWorld: the tiny synthetic dataset + the options of each command.
# ``ref_labels`` / ``ref_gt`` / ``ref_pretrain`` / ``ref_finetune``: the outputs of uninterrupted
# CLI runs of those commands (built once per session, on first use), the yardstick of every
# interrupted-and-rerun case. The helpers that run, signal and compare are in faultkit.py.


@pytest.fixture(scope="session")
def fault_world(tiny_synth: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory):
    from faultkit import FaultWorld

    root, version = tiny_synth
    return FaultWorld(root=root, version=version, cache=tmp_path_factory.mktemp("fault_cache"))


def _reference(tmp_path_factory: pytest.TempPathFactory, world, name: str, args_for) -> Path:
    """Run ``bevctl <args_for(out)>`` once, uninterrupted, into a fresh directory; return ``out``."""
    from faultkit import run_bevctl, temp_leftovers

    base = tmp_path_factory.mktemp(f"ref_{name}")
    out = base / name
    run_bevctl(args_for(out), world.env()).clean_exit()
    assert not temp_leftovers(base), temp_leftovers(base)
    return out


@pytest.fixture(scope="session")
def ref_labels(fault_world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _reference(tmp_path_factory, fault_world, "labels.zarr", fault_world.pseudolabel)


@pytest.fixture(scope="session")
def ref_gt(fault_world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _reference(tmp_path_factory, fault_world, "gt.zarr", fault_world.prepare_gt)


@pytest.fixture(scope="session")
def ref_pretrain(fault_world, ref_labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _reference(tmp_path_factory, fault_world, "pretrain", lambda out: fault_world.pretrain(out, ref_labels))


@pytest.fixture(scope="session")
def ref_finetune(fault_world, ref_gt: Path, ref_pretrain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _reference(tmp_path_factory, fault_world, "finetune",
                      lambda out: fault_world.finetune(out, ref_gt, ref_pretrain / "last.pt"))

"""The ``bevctl`` command line: each command parses its options and calls one library function.

Library code raises :class:`bevctl.errors.BevctlError` for user mistakes; :func:`main` turns it
into one ``error: ...`` line and exit code 2 (no traceback). Ctrl-C exits with 130.
Imports of heavy modules (torch, ray, transformers) happen inside the commands so that
``bevctl --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from bevctl.errors import BevctlError

app = typer.Typer(
    name="bevctl",
    help="Fine-grained BEV road-marking maps from six cameras with few BEV labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


# ---- synth ------------------------------------------------------------------------------------


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Directory to write the synthetic nuScenes-format dataset into."),
    scenes: int = typer.Option(10, "--scenes", help="Number of scenes."),
    samples_per_scene: int = typer.Option(40, "--samples-per-scene", help="Keyframes (2 Hz) per scene."),
    image_size: str = typer.Option("225x400", "--image-size", help="Camera image size HxW."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same bytes."),
    version: str = typer.Option("v1.0-synth", "--version", help="nuScenes version folder name."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset in OUT."),
) -> None:
    """Write a synthetic world in nuScenes format (tables, JPEGs, map expansion, image GT)."""
    from bevctl.data.synth import SynthConfig, parse_hw, write_synthetic_dataset

    cfg = SynthConfig(
        scenes=scenes,
        samples_per_scene=samples_per_scene,
        image_hw=parse_hw(image_size, "--image-size"),
        seed=seed,
        version=version,
    )
    write_synthetic_dataset(cfg, out, overwrite=overwrite)


# ---- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-run"), "--out", help="Directory for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="A smaller world and shorter training (a few minutes)."),
) -> None:
    """Run the method end to end on the embedded synthetic world (offline, CPU); resumable."""
    from bevctl.demo import run_demo

    run_demo(out, quick=quick)


def main() -> None:
    try:
        app(standalone_mode=False)
    except BevctlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive as ClickException
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()

"""`python -m backend COMMAND`: the backend's command-line interface.

Every command turns bad input into one sentence on stderr and exit code 2, and writes
no partial output (outputs go through `backend.atomic`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError


def _info(args: argparse.Namespace) -> None:
    from .device import device_report, pick_device

    report = device_report(pick_device(args.device))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key.endswith("_bytes") and value is not None:
            key, value = key.removesuffix("_bytes"), f"{value / 2**30:.1f} GiB"
        print(f"{key:<18} {value}")


def _synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_synthetic_bundle
    from .device import pick_device
    from .progress import TerminalProgress

    out = write_synthetic_bundle(
        seed=args.seed,
        views=args.views,
        resolution=args.res,
        environment=args.env,
        out=args.out,
        device=pick_device(args.device),
        progress=TerminalProgress(),
    )
    print(out)


def _export_gt(args: argparse.Namespace) -> None:
    from .data.synthetic import export_ground_truth
    from .device import pick_device
    from .progress import TerminalProgress

    out = export_ground_truth(
        seed=args.seed,
        out=args.out,
        resolution=args.resolution,
        texture_size=args.texture_size,
        target_faces=args.target_faces,
        device=pick_device(args.device),
        progress=TerminalProgress(),
    )
    print(out)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m backend", description="LSRM for Blender backend")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--device", default="auto", help="auto (default), cuda, mps or cpu")
        sub.set_defaults(handler=handler)
        return sub

    info = command("info", _info, "print versions, device, GPU name and free memory")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    synth = command("synth", _synth, "render a procedural object into a bundle with ground-truth materials")
    synth.add_argument("--seed", type=int, default=0, help="object seed (default 0)")
    synth.add_argument("--views", type=int, default=16, help="number of views (default 16)")
    synth.add_argument("--res", type=int, default=256, help="image width and height in pixels (default 256)")
    synth.add_argument("--env", type=Path, default=None, help="environment map (.exr/.hdr); default: a studio world")
    synth.add_argument("--out", type=Path, required=True, help="bundle folder to write")

    export = command("export-gt", _export_gt, "export a synthetic object's ground-truth field as a PBR GLB")
    export.add_argument("--seed", type=int, default=0, help="object seed (default 0)")
    export.add_argument("--out", type=Path, required=True, help="GLB file to write")
    export.add_argument("--resolution", type=int, default=256, help="marching-cubes grid size (default 256)")
    export.add_argument("--texture-size", type=int, default=1024, help="texture width and height (default 1024)")
    export.add_argument("--target-faces", type=int, default=100_000, help="simplify to this many faces; 0 keeps all")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

"""`python -m backend COMMAND`: the backend's command-line interface.

Every command turns bad input into one sentence on stderr and exit code 2, and writes
no partial output (outputs go through `backend.atomic`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .errors import InputError

CHECKPOINT_HELP = (
    "LSRM model weights (.safetensors); default: backend/assets/models/lsrm_small.safetensors when installed; "
    "'none': no model"
)


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


def _reconstruct(args: argparse.Namespace) -> None:
    from .progress import TerminalProgress
    from .reconstruct import reconstruct

    result = reconstruct(
        args.bundle,
        args.out,
        preset=args.preset,
        engine=args.engine,
        checkpoint=args.checkpoint,
        device=args.device,
        progress=TerminalProgress(),
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.path)
    psnr = f"{result.training_psnr:.2f} dB" if result.training_psnr is not None else "n/a (no refinement)"
    print(f"engine {result.engine}, training PSNR {psnr} on {result.views_used} views ({result.device})")
    for stage, seconds in result.timings.items():
        print(f"{stage:<20} {seconds:8.2f} s")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import EvaluateConfig, evaluate, prepare_inputs, score
    from .progress import TerminalProgress

    config = EvaluateConfig(
        preset=args.preset,
        engine=args.engine,
        checkpoint=args.checkpoint,
        device=args.device,
        views=args.views,
        test_views=args.test_views,
        resolution=args.res,
        samples=args.samples,
        input_environment=args.input_env,
        test_environment=args.test_env,
        seed=args.seed,
    )
    if (args.phase == "score") != (args.reconstructions is not None):
        raise InputError("--reconstructions goes with --phase score (and --phase score needs it); see --help")
    if args.phase == "score" and args.assets:
        raise InputError("--phase score takes no ASSET: it scores the assets the inputs phase prepared in --out")
    if args.phase == "inputs":
        names = prepare_inputs(args.assets, args.out, config, progress=TerminalProgress())
        print(f"{len(names)} assets prepared in {args.out}: {' '.join(names)}")
        return
    if args.phase == "score":
        report = score(args.out, args.reconstructions, progress=TerminalProgress())
        results = args.reconstructions
    else:
        report = evaluate(args.assets, args.out, config, progress=TerminalProgress())
        results = args.out
    for name, record in report["assets"].items():
        print(
            f"{name:<24} PSNR-H {record['psnr_h']:6.2f}  PSNR-L {record['psnr_l']:6.2f}  SSIM {record['ssim']:.4f}  "
            f"Chamfer {record['chamfer']:.4f}  normal {record['normal_error_deg']:5.1f} deg  "
            f"reconstruct {record['timings']['reconstruct s']:6.1f} s"
        )
    for name, error in report.get("failed", {}).items():
        print(f"{name:<24} not scored: {error}", file=sys.stderr)
    print(f"metrics: {results / 'metrics.json'}\nsheet:   {results / 'sheet.png'}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo
    from .progress import TerminalProgress

    metrics = run_demo(
        args.out, preset=args.preset, checkpoint=args.checkpoint, device=args.device, progress=TerminalProgress()
    )
    relit, geometry = metrics["relit"]["mean"], metrics["geometry"]
    for warning in metrics["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    seconds = metrics["timings"]["demo total"]
    print(
        f"demo ({metrics['preset']} preset, {metrics['device']}, {seconds:.0f} s): relit under a "
        f"new world PSNR-H {relit['psnr_h']:.2f} dB, PSNR-L {relit['psnr_l']:.2f} dB, SSIM {relit['ssim']:.3f}; "
        f"Chamfer {geometry['chamfer']:.4f}, normal error {geometry['normal_error_deg']:.1f} deg"
    )
    print(f"asset:      {args.out / 'barrel.glb'}\ncomparison: {args.out / 'comparison.png'}")
    print(f"metrics:    {args.out / 'metrics.json'}")


def _train(args: argparse.Namespace) -> None:
    from .train import TrainConfig, train

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values = {name: getattr(args, name) for name in names if name not in ("inputs", "environments")}
    record = train(TrainConfig(inputs=tuple(args.inputs), environments=tuple(args.environments), **values))
    if record:
        print(json.dumps(record))


def _serve(args: argparse.Namespace) -> None:
    from .server import ServiceConfig, serve
    from .uploads import MIB, UploadLimits

    limits = UploadLimits(
        request_bytes=args.max_request_mb * MIB,
        unpacked_bytes=args.max_unpacked_mb * MIB,
        image_bytes=args.max_image_mb * MIB,
        image_pixels=args.max_image_pixels,
        views=args.max_views,
    )
    names = ("host", "port", "work_dir", "token_file", "log_file", "checkpoint", "device", "preset", "max_queue")
    names += ("keep_fetched_s", "max_age_s", "preview_size")
    serve(ServiceConfig(limits=limits, **{name: getattr(args, name) for name in names}))


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

    from .presets import PRESETS
    from .reconstruct import ENGINES

    engine_help = "feedforward, refine or both (default: the preset's with a checkpoint, else refine)"

    rebuild = command("reconstruct", _reconstruct, "reconstruct a bundle of posed views into a relightable GLB")
    rebuild.add_argument("bundle", type=Path, help="bundle folder (or its transforms.json)")
    rebuild.add_argument("--out", type=Path, required=True, help="GLB file to write")
    rebuild.add_argument("--preset", choices=list(PRESETS), default="standard", help="budget (default standard)")
    rebuild.add_argument("--engine", choices=ENGINES, default=None, help=engine_help)
    rebuild.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)

    from .shading import BUILTIN_ENVIRONMENTS

    evaluate = command("evaluate", _evaluate, "relighting benchmark: render assets in Blender, reconstruct, score")
    evaluate.add_argument("assets", type=Path, nargs="*", metavar="ASSET", help=".glb, .gltf or .obj (+.mtl) files")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for metrics.json, sheet.png and renders")
    evaluate.add_argument(
        "--phase",
        choices=("all", "inputs", "score"),
        default="all",
        help="all (default); inputs: render bundles and ground truth into --out only; score: score the GLBs of "
        "--reconstructions (bench/devset_reconstruct.py's) against --out's inputs, with the inputs' render settings",
    )
    evaluate.add_argument(
        "--reconstructions", type=Path, default=None, help="with --phase score: folder of NAME.glb + NAME.json"
    )
    evaluate.add_argument("--preset", choices=list(PRESETS), default="standard", help="budget (default standard)")
    evaluate.add_argument("--engine", choices=ENGINES, default=None, help=engine_help)
    evaluate.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    evaluate.add_argument("--views", type=int, default=16, help="input views per asset (default 16)")
    evaluate.add_argument("--test-views", type=int, default=4, help="held-out relit views per asset (default 4)")
    evaluate.add_argument("--res", type=int, default=256, help="image width and height in pixels (default 256)")
    evaluate.add_argument("--samples", type=int, default=32, help="Cycles samples per pixel (default 32)")
    evaluate.add_argument("--input-env", choices=BUILTIN_ENVIRONMENTS, default="studio", help="input lighting (studio)")
    evaluate.add_argument("--test-env", choices=BUILTIN_ENVIRONMENTS, default="forest", help="test lighting (forest)")
    evaluate.add_argument("--seed", type=int, default=0, help="camera layout, Cycles and sampling seed (default 0)")

    demo = command("demo", _demo, "reconstruct the committed demo bundle, relight it under a new world and score it")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    demo.add_argument("--preset", choices=list(PRESETS), default=None, help="default: standard on a GPU, else cpu")
    demo.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)

    _add_train(command)

    from .uploads import MIB, UploadLimits

    limits = UploadLimits()
    serve = command("serve", _serve, "run the local HTTP service (jobs over HTTP, API under /v1)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: any free port, printed on start)")
    serve.add_argument("--work-dir", type=Path, default=None, help="jobs, token, log (default: user cache)")
    serve.add_argument("--token-file", type=Path, default=None, help="bearer token file; made if missing (WORK/token)")
    serve.add_argument("--log-file", type=Path, default=None, help="log file (default WORK/service.log)")
    serve.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    serve.add_argument("--preset", choices=list(PRESETS), default=None, help="when a job names none")
    serve.add_argument("--max-queue", type=int, default=8, help="jobs that may wait (default 8)")
    serve.add_argument("--keep-fetched-s", type=float, default=300.0, help="keep results after download (300 s)")
    serve.add_argument("--max-age-s", type=float, default=86400.0, help="delete finished jobs after this (1 day)")
    serve.add_argument("--preview-size", type=int, default=128, help="preview PNG size in pixels; 0: none (128)")
    serve.add_argument("--max-request-mb", type=int, default=limits.request_bytes // MIB, help="upload limit (MiB)")
    serve.add_argument("--max-unpacked-mb", type=int, default=limits.unpacked_bytes // MIB, help="unzipped limit (MiB)")
    serve.add_argument("--max-image-mb", type=int, default=limits.image_bytes // MIB, help="per-image file limit (MiB)")
    serve.add_argument("--max-image-pixels", type=int, default=limits.image_pixels, help="per-image width x height")
    serve.add_argument("--max-views", type=int, default=limits.views, help="views per bundle (default %(default)s)")
    return parser


def _add_train(command) -> None:
    from .data.sources import SOURCES
    from .model.config import CONFIGS
    from .train import TrainConfig

    d = TrainConfig(out=Path("."))
    train = command("train", _train, "train the LSRM transformer (torchrun-launchable; resumes from --out)")
    train.add_argument("--out", type=Path, required=True, help="run folder: weights, optimizer state, log, eval PNGs")
    train.add_argument("--model", choices=list(CONFIGS), default=d.model, help=f"model config (default {d.model})")
    train.add_argument("--stage", type=int, default=d.stage, help="1: dense transformer (default); 2: sparse stage")
    train.add_argument(
        "--init",
        type=Path,
        default=None,
        help="weights to start from (stage 2: stage 1's; stage 1: continue, new optimizer)",
    )
    train.add_argument("--steps", type=int, default=d.steps, help="steps; 0: as many as fit in --time-limit")
    train.add_argument("--time-limit", type=float, default=d.time_limit, help="seconds before saving and stopping")
    train.add_argument("--batch", type=int, default=d.batch, help=f"objects per device and step ({d.batch})")
    train.add_argument(
        "--inputs", type=int, nargs=2, default=list(d.inputs), metavar=("MIN", "MAX"), help="input views"
    )
    train.add_argument("--targets", type=int, default=d.targets, help=f"target views per object ({d.targets})")
    train.add_argument("--resolution", type=int, default=d.resolution, help="view size; 0: the model's image size")
    train.add_argument("--rays", type=int, default=d.rays, help=f"target rays per object and step ({d.rays})")
    train.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr})")
    train.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up steps ({d.warmup})")
    train.add_argument("--min-lr-fraction", type=float, default=d.min_lr_fraction, help="cosine floor")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    train.add_argument("--clip", type=float, default=d.clip, help="gradient norm clip")
    train.add_argument("--data", choices=SOURCES, default=d.data, help=f"training views (default {d.data})")
    train.add_argument("--data-dir", type=Path, default=None, help="bundle folder for --data folder")
    train.add_argument("--furniture-dir", type=Path, default=None, help="sweethome3d-furniture archives folder")
    train.add_argument("--environments", nargs="+", default=list(d.environments), help="studio worlds to light with")
    train.add_argument("--pool", type=int, default=d.pool, help=f"rendered objects kept per device ({d.pool})")
    train.add_argument("--refresh-every", type=int, default=d.refresh_every, help="steps per re-rendered object")
    train.add_argument(
        "--prefetch",
        type=int,
        default=d.prefetch,
        help="pool objects a background process renders ahead (e.g. 3 on a GPU); 0 (default): inline, as on a "
        "CPU, where the producer would only take cores from training (on one busy H200, 1.6x the samples/s)",
    )
    train.add_argument("--depth-weight", type=float, default=d.depth_weight, help="depth loss weight")
    train.add_argument("--material-weight", type=float, default=d.material_weight, help="material loss weight")
    train.add_argument(
        "--surface-material-weight",
        type=float,
        default=d.surface_material_weight,
        help="weight of materials read on the known true surface",
    )
    train.add_argument("--sdf-weight", type=float, default=d.sdf_weight, help="known-SDF loss weight")
    train.add_argument("--normal-weight", type=float, default=d.normal_weight, help="numerical normal loss weight")
    train.add_argument("--normal-steps", type=int, default=d.normal_steps, help="last steps with the normal loss")
    train.add_argument("--guide", choices=("model", "truth"), default=d.guide, help="stage-2 token selection")
    train.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between saves")
    train.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluation renders")
    train.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    train.add_argument("--seed", type=int, default=d.seed, help="run seed (default 0)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    train.add_argument(
        "--sequence-parallel",
        type=int,
        default=d.sequence_parallel,
        metavar="N",
        help="stage 2: groups of N ranks share each batch and split its sparse tokens by whole blocks (default 1)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "checkpoint"):
        from .feedforward import checkpoint_choice

        args.checkpoint = checkpoint_choice(args.checkpoint)
    try:
        args.handler(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

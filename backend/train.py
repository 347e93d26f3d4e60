"""Training Engine A, on one device or many (`torchrun --nproc_per_node N -m backend train ...`).

The paper's schedule (LSRM §3.6): stage 1 trains the dense transformer; stage 2 starts the sparse one
from a stage-1 checkpoint (`LSRM.start_sparse_from_dense`), freezes the dense model and trains the
sparse residual on the fly from its predictions. Every step draws input views and separate target
views from a pool of rendered objects (`data.views.ScenePool`), predicts each object's field and
renders it through the targets' rays with the one renderer (`model.losses.view_loss`): colour, mask,
depth, eikonal, material maps and a known SDF where the data has them, and the numerical normal loss
over the last steps.

Runs are deterministic per rank and step (the random state is re-seeded from (seed, data rank, step)), so
a run resumed from its folder continues exactly as it would have: `model.safetensors` (weights and
config), `optimizer.safetensors` (AdamW state without pickle) and `state.json` (step, schedule,
settings) are written together every `checkpoint_every` steps, at the time limit and on SIGTERM.
`log.jsonl` holds loss terms and throughput; `eval/step_N.png` compares held-out renders with the truth.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .atomic import atomic_file
from .data.prefetch import Prefetcher
from .data.sources import FIRST_TRAINING_SEED, SOURCES, SourceSpec, make_source
from .data.views import Batch, EnvironmentBank, ScenePool, ViewSet, sample_batch
from .device import pick_device
from .errors import InputError
from .field import GridField
from .model.checkpoint import load_checkpoint, load_optimizer, read_metadata, save_checkpoint, save_optimizer
from .model.config import CONFIGS
from .model.losses import LossConfig, view_loss
from .model.lsrm import LSRM
from .parallel import sequence_group
from .progress import Progress, TerminalProgress, no_progress
from .render import RenderOptions, render_views
from .shading import BUILTIN_ENVIRONMENTS
from .sheet import write_sheet

STATE = "state.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
LOG = "log.jsonl"
EVAL_SEED = 424_242  # the held-out evaluation object (below FIRST_TRAINING_SEED, so never trained on)
CALIBRATION_STEPS = (5, 25)  # --steps 0: time steps 5..25 and fit the schedule into the time limit
# Settings that must not change when a run is resumed (others, like the time limit, may).
FIXED_ON_RESUME = ("model", "stage", "seed", "batch", "lr", "warmup", "data", "inputs", "targets", "resolution")


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    model: str = "small"  # a named config of model/config.py
    stage: int = 1  # 1: dense transformer; 2: sparse stage from a stage-1 checkpoint (--init)
    init: Path | None = None  # weights to start from: stage 2 needs stage 1's; stage 1 may continue a run
    steps: int = 1000  # 0: as many as fit in time_limit (measured after a few steps)
    time_limit: float = 0.0  # seconds of training before saving and stopping; 0: none
    batch: int = 4  # objects per device and step
    inputs: tuple[int, int] = (8, 12)  # input views per object, drawn in this range each step
    targets: int = 4  # target views per object
    resolution: int = 0  # rendered view size; 0: the model's stage-1 image size
    rays: int = 1024  # target rays rendered per object and step
    lr: float = 4e-4
    warmup: int = 100
    min_lr_fraction: float = 0.1  # the cosine ends at this fraction of lr
    weight_decay: float = 0.05
    clip: float = 1.0
    data: str = "synthetic"
    data_dir: Path | None = None  # the folder source's bundles
    furniture_dir: Path | None = None  # folder of sweethome3d-furniture archives (default: the Debian package's)
    environments: tuple[str, ...] = BUILTIN_ENVIRONMENTS  # studio worlds that light rendered training views
    pool: int = 16  # rendered objects kept per device
    refresh_every: int = 2  # re-render one pool object every this many steps
    # Scenes a producer process renders ahead (data/prefetch.py); 0 renders them inline. Inline by default:
    # on a CPU the producer only takes cores from training; on a GPU it gave 1.6x on a busy host (docs/TRAINING.md),
    # not yet compared on an idle one.
    prefetch: int = 0
    depth_weight: float = 0.1  # run 1 used 0.5: its gradient then outweighed colour's 100 to 1 (docs/TRAINING.md)
    material_weight: float = 2.0
    surface_material_weight: float = 5.0  # materials at points of the known true surface (procedural, furniture)
    sdf_weight: float = 1.0  # known SDF of procedural / furniture objects (0 turns the term off)
    normal_weight: float = 0.1
    normal_steps: int = 500  # the numerical normal loss joins for the last this many steps
    guide: str = "model"  # stage 2's token selection: "model" (stage-1 prediction) or "truth" (known geometry)
    checkpoint_every: int = 500
    eval_every: int = 250  # 0: no evaluation renders
    log_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = False
    # Stage 2 over groups of this many ranks (block-aware sequence parallelism, backend/parallel.py): the ranks of a
    # group train on the same objects, each computing its share of the long sparse sequence.
    sequence_parallel: int = 1
    device: str = "auto"

    def check(self) -> None:
        """One sentence for the first unusable setting."""
        if self.model not in CONFIGS:
            raise InputError(f"unknown model config '{self.model}'; use one of {', '.join(CONFIGS)}")
        if self.stage not in (1, 2):
            raise InputError(f"--stage {self.stage} is not a training stage; use 1 (dense) or 2 (sparse)")
        if self.stage == 2 and self.init is None and not (Path(self.out) / STATE).is_file():
            raise InputError("--stage 2 starts from a stage-1 checkpoint; pass it with --init PATH")
        if self.init is not None:
            read_metadata(self.init)  # a clear sentence for a missing or foreign file
        if self.steps < 0 or (self.steps == 0 and self.time_limit <= 0):
            raise InputError("--steps must be positive, or 0 together with a --time-limit to fit the steps into")
        if self.time_limit < 0:
            raise InputError(f"--time-limit {self.time_limit} is negative; give seconds, or 0 for no limit")
        low, high = self.inputs
        if not 1 <= low <= high or self.targets < 1:
            raise InputError(f"--inputs {low} {high} / --targets {self.targets}: need 1 <= min <= max and targets >= 1")
        if self.batch < 1 or self.pool < self.batch:
            raise InputError(f"--batch {self.batch} must be at least 1 and at most --pool {self.pool}")
        EnvironmentBank(self.environments)  # one sentence for an unknown name
        if self.data not in SOURCES:
            raise InputError(f"unknown --data '{self.data}'; use one of {', '.join(SOURCES)}")
        if self.guide not in ("model", "truth"):
            raise InputError(f"--guide '{self.guide}' is unknown; use model or truth")
        if self.lr <= 0 or self.rays < 1 or self.refresh_every < 1 or self.resolution < 0:
            raise InputError("--lr, --rays and --refresh-every must be positive and --resolution not negative")
        if self.sequence_parallel < 1 or (self.sequence_parallel > 1 and self.stage != 2):
            raise InputError(
                f"--sequence-parallel {self.sequence_parallel}: give 1, or more with --stage 2 (stage 1 is dense)"
            )
        if self.prefetch < 0 or (self.prefetch and self.data == "folder"):
            raise InputError(
                "--prefetch must be 0 or more, and 0 with --data folder (its views are loaded, not rendered)"
            )
        out = Path(self.out)
        if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / STATE).is_file()):
            raise InputError(f"--out '{out}' is a file or a folder that holds no training run; give a new folder")

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    device: torch.device
    sequence_parallel: int = 1  # ranks per group that share one batch
    group: dist.ProcessGroup | None = None  # this rank's sequence-parallel group (None: size 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which batches this rank draws: the ranks of one sequence-parallel group draw the same."""
        return self.rank // self.sequence_parallel


def start_process(choice: str, sequence_parallel: int = 1) -> Process:
    """This process's rank and device; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % sequence_parallel:
        raise InputError(
            f"--sequence-parallel {sequence_parallel} needs a multiple of {sequence_parallel} ranks (torchrun "
            f"--nproc_per_node), not {world}"
        )
    if world == 1:
        return Process(0, 1, pick_device(choice))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(choice)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(rank, world, device, sequence_parallel, sequence_group(sequence_parallel))


def _all_reduce(values: torch.Tensor, process: Process, op=None) -> torch.Tensor:
    if process.world > 1:
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


# ----------------------------------------------------------------------------- pieces


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then a cosine down to min_lr_fraction of lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, total - config.warmup))
    floor = config.min_lr_fraction
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def trainable(model: LSRM, stage: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Stage 1 trains the dense transformer and the field heads; stage 2 only the sparse transformer (§3.6)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("sparse.") if stage == 2 else not name.startswith("sparse."))
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def float32_field(field: GridField) -> GridField:
    """The field with float32 grids (autocast leaves bf16 ones), still attached to the graph."""
    converted = copy.copy(field)
    converted.dense, converted.sparse_features = field.dense.float(), field.sparse_features.float()
    return converted


def loss_config(config: TrainConfig, step: int, total: int) -> LossConfig:
    normal = config.normal_weight if step >= total - config.normal_steps else 0.0
    return LossConfig(
        rays=config.rays,
        depth=config.depth_weight,
        material=config.material_weight,
        surface_material=config.surface_material_weight,
        sdf=config.sdf_weight,
        normal=normal,
    )


def target_loss(field: GridField, target: ViewSet, losses: LossConfig, generator: torch.Generator) -> dict:
    """The loss terms of one predicted field against its object's target views (`view_loss`)."""
    return view_loss(
        float32_field(field),
        target.cameras,
        target.images,
        target.masks,
        target.environment,
        losses,
        generator,
        target.buffers,
        target.truth,
    )


def batch_loss(
    model: LSRM,
    forward: torch.nn.Module,
    batch: Batch,
    stage: int,
    losses: LossConfig,
    guide: str,
    generator: torch.Generator,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, float], dict[str, int]]:
    """Mean loss over the batch's objects, the mean of each term, and the token counts (group: `LSRM.forward`)."""
    device = batch.views.images.device
    guides = [t.truth for t in batch.targets] if stage == 2 and guide == "truth" else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        prediction = forward(batch.views, stages=stage, guide=guides, group=group)
    totals, terms_sum = [], {}
    for field, target in zip(prediction.fields, batch.targets, strict=True):
        terms = target_loss(field, target, losses, generator)
        totals.append(terms["total"])
        for key, value in terms.items():
            terms_sum[key] = terms_sum.get(key, 0.0) + float(value.detach())
    # Every trainable parameter takes part in every step (DDP needs that): stage 2 may skip its sparse
    # path for an object with no surface yet, so add a zero that touches them all.
    total = torch.stack(totals).mean() + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
    return total, {k: v / len(totals) for k, v in terms_sum.items()}, prediction.counts


def tokens_per_object(counts: dict[str, int], batch: int) -> float:
    """Stage-1 tokens per object plus the batch's stage-2 tokens per object."""
    stage1 = counts.get("stage-1 volume tokens", 0) + counts.get("stage-1 image tokens", 0)
    return stage1 + (counts.get("volume tokens", 0) + counts.get("image tokens", 0)) / batch


# ----------------------------------------------------------------------------- saving and resuming


def save_run(out: Path, model: LSRM, optimizer, names: list[str], state: dict) -> None:
    """Weights, optimizer state, then state.json last: a run folder is whole once its state names the step."""
    notes = {"step": str(state["step"]), "stage": str(state["config"]["stage"])}
    save_checkpoint(model, out / MODEL, notes=notes)
    save_optimizer(optimizer, names, out / OPTIMIZER)
    with atomic_file(out / STATE) as partial:
        partial.write_text(json.dumps(state, indent=2))


def load_run(out: Path, config: TrainConfig, model: LSRM, optimizer, names: list[str]) -> dict:
    state = json.loads((out / STATE).read_text())
    saved = state["config"]
    changed = [key for key in FIXED_ON_RESUME if saved.get(key) != config.to_json()[key]]
    if changed:
        raise InputError(
            f"--out '{out}' holds a run with other {', '.join(changed)}; resume with the same settings or use a "
            "new folder"
        )
    metadata = read_metadata(out / MODEL)
    if metadata.get("note.step") != str(state["step"]):
        raise InputError(
            f"'{out / MODEL}' is not from step {state['step']} of {out / STATE}; the run folder is mixed up"
        )
    model.load_state_dict(load_checkpoint(out / MODEL).state_dict())
    load_optimizer(optimizer, names, out / OPTIMIZER)
    return state


# ----------------------------------------------------------------------------- evaluation renders


class Evaluation:
    """A fixed held-out procedural object: 8 input views under one world, 2 other views to compare with."""

    def __init__(self, make, background: bool) -> None:
        self.viewset: ViewSet = make(EVAL_SEED)
        self.background = background
        self.generator = torch.Generator().manual_seed(EVAL_SEED)

    @torch.no_grad()
    def __call__(self, model: LSRM, stage: int, path: Path, inputs: int) -> float:
        """Write a sheet (truth row, prediction row) and return the PSNR of the predicted colours."""
        count = min(inputs, len(self.viewset) - 2)
        batch = sample_batch([self.viewset], count, 2, self.background, self.generator.manual_seed(EVAL_SEED))
        target = batch.targets[0]
        was_training = model.training
        model.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=target.images.device.type == "cuda"):
            field = float32_field(model(batch.views, stages=stage).fields[0])
        model.train(was_training)
        options = RenderOptions(samples=48, importance_samples=32, chunk_rays=16384)
        render = render_views(field, target.cameras, target.environment, options)
        truth = torch.cat([target.images * target.masks[..., None], target.masks[..., None]], -1)
        predicted = torch.cat([render.rgb, render.alpha], -1)
        write_sheet(path, [list(truth.cpu()), list(predicted.cpu())])
        error = (render.rgb.clamp(0, 1) - truth[..., :3].clamp(0, 1)).square().mean()
        return float(-10.0 * torch.log10(error.clamp_min(1e-10)))


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig, progress: Progress | None = None) -> dict:
    """Train (or resume) into config.out; returns the last logged record."""
    config.check()
    process = start_process(config.device, config.sequence_parallel)
    out = Path(config.out)
    progress = progress or (TerminalProgress() if process.main else no_progress)
    started = time.perf_counter()
    stop_requested = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    try:
        with contextlib.ExitStack() as resources:  # the scene producer, stopped however training ends
            return _train(config, process, out, progress, started, stop_requested, resources)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if process.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    process: Process,
    out: Path,
    progress: Progress,
    started: float,
    stop,
    resources: contextlib.ExitStack,
) -> dict:
    device = process.device
    torch.manual_seed(config.seed)
    resume = (out / STATE).is_file()
    start_from = config.init is not None and not resume
    model = load_checkpoint(config.init) if start_from else LSRM(CONFIGS[config.model])
    wanted = CONFIGS[config.model]
    if start_from and wanted.colour_skip and model.config == dataclasses.replace(wanted, colour_skip=False):
        model = model.with_colour_skip()  # a run from before the skip continues with it
    if start_from and model.config != wanted:
        raise InputError(f"--init '{config.init}' is not a '{config.model}' checkpoint; pass the matching --model")
    if config.stage == 2 and not resume:
        model.start_sparse_from_dense()
    model = model.to(device).train()
    model.gradient_checkpointing = config.gradient_checkpointing
    named = trainable(model, config.stage)
    names = [name for name, _ in named]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=config.weight_decay)

    total, step = config.steps, 0
    if resume:
        state = load_run(out, config, model, optimizer, names)
        step = state["step"]
        total = config.steps or state["total_steps"]  # a new --steps extends (or shortens) the schedule
    if process.world > 1:
        forward = DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)
    else:
        forward = model

    resolution = config.resolution or model.config.image_size
    views = config.inputs[1] + config.targets + 4  # a few spare views, so inputs and targets vary
    spec = SourceSpec(
        config.data, views, resolution, str(device), config.environments, config.data_dir, config.furniture_dir
    )
    bank = spec.bank()
    pool = ScenePool(
        spec.build(bank), config.pool, config.refresh_every, FIRST_TRAINING_SEED + process.data_rank * 10_000_000
    )
    if config.prefetch and device.type not in ("cuda", "cpu"):
        raise InputError(f"--prefetch shares tensors between processes on CUDA or the CPU, not {device.type}; use 0")
    if config.prefetch:  # a producer process renders the pool's next scenes while this one trains
        pool.make = resources.enter_context(Prefetcher(spec, pool.first_seed(step), config.prefetch, bank))
        resources.callback(pool.slots.clear)  # runs first: drop the producer's tensors before it stops
    evaluation = None
    if process.main:
        out.mkdir(parents=True, exist_ok=True)
    if process.main and config.eval_every > 0:
        evaluation = Evaluation(make_source("synthetic", views, resolution, device, bank), model.config.background)
        (out / "eval").mkdir(exist_ok=True)
    progress("scene pool", 0.0)
    pool.at_step(step)
    progress("scene pool", 1.0)

    record: dict = {}
    window = {"steps": 0, "seconds": 0.0, "data": 0.0, "samples": 0, "tokens": 0.0}
    step_times: list[float] = []
    while total == 0 or step < total:
        clock = time.perf_counter()
        seed = step_seed(config.seed, process.data_rank, step)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        viewsets = pool.at_step(step)
        chosen = torch.randperm(len(viewsets), generator=generator)[: config.batch].tolist()
        inputs = int(torch.randint(config.inputs[0], config.inputs[1] + 1, (1,), generator=generator))
        batch = sample_batch([viewsets[i] for i in chosen], inputs, config.targets, model.config.background, generator)
        data_seconds = time.perf_counter() - clock

        lr = learning_rate(step, max(total, config.warmup + 1), config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = loss_config(config, step, total or 10**9)
        loss, terms, counts = batch_loss(
            model, forward, batch, config.stage, losses, config.guide, generator, process.group
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], config.clip))
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - clock
        step += 1
        step_times.append(seconds)

        window["steps"] += 1
        window["seconds"] += seconds
        window["data"] += data_seconds
        window["samples"] += batch.size
        window["tokens"] += tokens_per_object(counts, batch.size) * batch.size
        if total == 0 and len(step_times) == CALIBRATION_STEPS[1]:
            total = _fit_steps(step_times, config, process, started)
        if step % config.log_every == 0 or step == total:
            record = _log(out, process, step, total, lr, grad_norm, terms, window, started, counts)
            window = dict.fromkeys(window, 0)
            window["seconds"] = 0.0
        progress(f"train stage {config.stage}", step / total if total else 0.0)

        elapsed = time.perf_counter() - started
        margin = 3 * max(step_times[-20:]) + 10.0  # room for the last step and the save
        out_of_time = config.time_limit > 0 and elapsed + margin > config.time_limit
        flag = _all_reduce(torch.tensor([float(out_of_time or bool(stop))], device=device), process, dist.ReduceOp.MAX)
        finished = step == total or bool(flag.item())
        state = {"step": step, "total_steps": total, "config": config.to_json(), "elapsed_s": elapsed}
        if process.main and (step % config.checkpoint_every == 0 or finished):
            save_run(out, model, optimizer, names, state)
            if step % config.checkpoint_every == 0:
                save_checkpoint(model, out / "checkpoints" / f"step_{step:06d}.safetensors", notes={"step": str(step)})
        if evaluation is not None and (step % config.eval_every == 0 or finished):
            psnr = evaluation(model, config.stage, out / "eval" / f"step_{step:06d}.png", config.inputs[1])
            _append(out / LOG, {"step": step, "eval_psnr": round(psnr, 3)})
            record["eval_psnr"] = psnr
        if finished:
            break
    if process.world > 1:
        dist.barrier()
    return record if process.main else {}


def _fit_steps(step_times: list[float], config: TrainConfig, process: Process, started: float) -> int:
    """--steps 0: as many steps as the time limit leaves room for, at the measured speed (all ranks agree)."""
    first, last = CALIBRATION_STEPS
    left = config.time_limit - (time.perf_counter() - started) - 30.0  # evaluation renders and saves
    # Each rank's clock started when it did: all take the slowest step and the least time left, or one
    # would plan a step more than another and wait for it at the last collective forever.
    step_seconds = sum(step_times[first:last]) / (last - first)
    measured = torch.tensor([step_seconds, -left], dtype=torch.float64, device=process.device)
    slowest_step, minus_least_left = _all_reduce(measured, process, dist.ReduceOp.MAX).tolist()
    return max(last + 1, last + int(-minus_least_left / (slowest_step * 1.05)))


def _log(out: Path, process: Process, step, total, lr, grad_norm, terms, window, started, counts) -> dict:
    measured = torch.tensor([window["samples"], window["tokens"]], dtype=torch.float64, device=process.device)
    samples, tokens = (_all_reduce(measured, process) / process.sequence_parallel).tolist()  # a group's batch once
    seconds = max(window["seconds"], 1e-9)
    record = {
        "step": step,
        "total_steps": total,
        "lr": lr,
        "grad_norm": round(grad_norm, 5),
        **{f"loss_{k}": round(v, 6) for k, v in terms.items()},
        "samples_per_s": round(samples / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "data_fraction": round(window["data"] / seconds, 3),
        "ranks": process.world,
        "sequence_parallel": process.sequence_parallel,
        **_sequence_share(counts),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if process.device.type == "cuda":
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(process.device) / 2**30, 2)
    if process.main:
        _append(out / LOG, record)
    return record


def _sequence_share(counts: dict[str, int]) -> dict[str, float]:
    """Under sequence parallelism, the share of the last step's stage-2 tokens the main rank computed."""
    if "tokens on this rank" not in counts:
        return {}
    total = counts["volume tokens"] + counts["image tokens"]
    return {"sequence_share": round(counts["tokens on this rank"] / max(total, 1), 3)}


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")

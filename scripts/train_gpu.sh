#!/usr/bin/env bash
# The GPU launcher for issue 5's training, run as-is from the repository root on a CUDA machine:
#
#   scripts/train_gpu.sh scaling            # ~3 min: training throughput on 1, 2, 4 (... all) GPUs
#   scripts/train_gpu.sh sp-scaling         # stage 2, one object per step, its sequence split over 1, 2, 4 GPUs
#   scripts/train_gpu.sh train [SECONDS] [INIT]  # stage 1 of `small` on the visible GPUs, stopping (saved)
#                                           # within SECONDS, starting from the weights INIT when given
#                                           # (e.g. out/checkpoints/lsrm_small_step1516.safetensors)
#   scripts/train_gpu.sh stage2 [SECONDS]   # a short stage 2 from $OUT/stage1 (tokens picked by known geometry)
#   scripts/train_gpu.sh colour [CHECKPOINT]  # ~1 min: does the model see colour? (bench/colour_response.py on
#                                           # $OUT/stage1/model.safetensors by default; `train` runs it at the end)
#
# PREFETCH=N (default 3) renders the scene pool's next N objects in a background process per GPU
# (`train --prefetch`, docs/TRAINING.md: 1.16-1.27x on H200s); PREFETCH=0 renders inline. The scaling
# files end in _prefetchN when N > 0.
# SP=N (default 1): `stage2` runs sequence-parallel over groups of N GPUs that share each batch.
#
# Outputs go under $OUT (default out/gpu): bench/*.json, stage1/ and stage2/ run folders (weights,
# optimizer state, log.jsonl, eval/*.png). Rerunning `train` with the same $OUT resumes the run.
# Wheels in .whl/ (safetensors, pillow, openexr, ...) are installed first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
MODE=${1:-train}
SECONDS_LIMIT=${2:-540}
INIT=${3:-}
PREFETCH=${PREFETCH:-3}
SP=${SP:-1}
if [ -d .whl ] && ! python -c "import safetensors, OpenEXR, PIL, psutil" 2>/dev/null; then
    python -m pip install --quiet --no-index --no-deps .whl/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")  # honours the caller's CUDA_VISIBLE_DEVICES
if [ "$GPUS" -lt 1 ]; then echo "no CUDA GPU visible" >&2; exit 1; fi
launch() {  # launch NPROC ARGS...: one process per GPU through torchrun
    local n=$1; shift
    torchrun --standalone --nproc_per_node "$n" "$@"
}
# Recipe: `small`, 8-12 input views at 256 px, 4 targets, 1024 rays per target set, the loss weights of
# TrainConfig (colour fix, docs/TRAINING.md); a checkpoint every 250 steps (about 3 minutes on 3 H200s).
RECIPE=(--model small --batch 4 --inputs 8 12 --targets 4 --rays 1024 --pool 16 --refresh-every 3
        --lr 4e-4 --warmup 100 --normal-steps 150 --checkpoint-every 250 --eval-every 250 --log-every 10
        --prefetch "$PREFETCH")
# Furniture joins (half the objects) when packed archives were carried to .gpu/furniture
# (`python scripts/pack_furniture.py --out .gpu/furniture --megabytes 6`) or the Debian package is installed.
if ls .gpu/furniture/*.sh3f >/dev/null 2>&1; then
    RECIPE+=(--data mixed --furniture-dir .gpu/furniture)
elif [ -d /usr/share/sweethome3d/furniture ]; then
    RECIPE+=(--data mixed)
fi

case "$MODE" in
scaling)
    runs=()
    suffix=$([ "$PREFETCH" -gt 0 ] && echo "_prefetch$PREFETCH" || true)
    for n in 1 2 4 8; do
        if [ "$n" -le "$GPUS" ]; then
            launch "$n" bench/train_throughput.py --model small --batch 4 --inputs 12 --warm 8 --steps 16 \
                --prefetch "$PREFETCH" --out "$OUT/bench/train_${n}gpu$suffix.json"
            runs+=("$OUT/bench/train_${n}gpu$suffix.json")
        fi
    done
    python bench/train_throughput.py --summarise "${runs[@]}" --out "$OUT/bench/train_scaling$suffix.json"
    ;;
sp-scaling)
    runs=()
    for n in 1 2 4 8; do
        if [ "$n" -le "$GPUS" ]; then
            launch "$n" bench/train_throughput.py --model small --stage 2 --sequence-parallel "$n" --batch 1 \
                --inputs 12 --warm 8 --steps 16 --prefetch "$PREFETCH" --out "$OUT/bench/train_stage2_sp$n.json"
            runs+=("$OUT/bench/train_stage2_sp$n.json")
        fi
    done
    python bench/train_throughput.py --summarise "${runs[@]}" --out "$OUT/bench/train_stage2_sp_scaling.json"
    ;;
train)
    if [ -n "$INIT" ]; then  # (a resumed run ignores --init and keeps its own weights)
        RECIPE+=(--init "$INIT" --warmup 30)  # continuing trained weights: a short warm-up of the new optimizer
    fi
    launch "$GPUS" -m backend train --out "$OUT/stage1" --stage 1 --steps 0 --time-limit "$SECONDS_LIMIT" "${RECIPE[@]}"
    python bench/colour_response.py --checkpoint "$OUT/stage1/model.safetensors" --out "$OUT/bench/colour_response.json"
    ;;
colour)
    python bench/colour_response.py --checkpoint "${2:-$OUT/stage1/model.safetensors}" \
        --out "$OUT/bench/colour_response.json"
    ;;
stage2)
    launch "$GPUS" -m backend train --out "$OUT/stage2" --stage 2 --init "$OUT/stage1/model.safetensors" \
        --steps 0 --time-limit "$SECONDS_LIMIT" --guide truth "${RECIPE[@]}" --warmup 20 --lr 2e-4 \
        --sequence-parallel "$SP"
    ;;
*)
    echo "usage: scripts/train_gpu.sh scaling | sp-scaling | train [SECONDS] [INIT] | stage2 [SECONDS] | colour [CHECKPOINT]" >&2
    exit 2
    ;;
esac

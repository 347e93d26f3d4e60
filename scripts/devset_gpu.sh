#!/usr/bin/env bash
# The development-set table of issue 3 through a GPU machine that has no Blender: evaluate's three
# phases split across machines (backend/evaluate.py). From the repository root:
#
#   here: python -m backend evaluate ASSET... --out out/devset_gpu --phase inputs --res 512 --views 16
#   here: scripts/devset_gpu.sh pack [DIR]              # DIR's bundles (default out/devset_gpu) -> .gpu/devset/
#   GPU:  scripts/devset_gpu.sh run [SECONDS]           # reconstruct .gpu/devset with each preset -> out/devset_run/
#   GPU:  scripts/devset_gpu.sh return DEST [FIRST]     # out/devset_run as 15 MB tar parts: parts FIRST.. (4) -> DEST
#   here: scripts/devset_gpu.sh unpack RUN PARTS_DIR... # join the parts (checksums checked) and untar into RUN
#   here: python -m backend evaluate --phase score --out out/devset_gpu --reconstructions RUN/<preset>
#
# `run` finishes within SECONDS (default 560) and resumes: a second call keeps every GLB already made.
# With two GPUs or more, GPU 0 runs `standard` on every asset, then `high` on the second of HIGH_ASSETS
# (default "barrel synthetic_1"); GPU 1 runs `fast`, profiles `standard` once (bench/profile_refine.py),
# then `high` on the first; an object starts only when its preset's time still fits (110 s standard,
# 40 s fast, 300 s high). With one GPU the same work runs in that order. Two calls of 560 s give the
# whole table. CHECKPOINT=path adds --checkpoint (the presets' own engines); without it all refine.
# Wheels in .whl/ are installed first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
PAYLOAD=.gpu/devset
RUN=${RUN:-out/devset_run} # another RUN=... keeps a second table (e.g. with CHECKPOINT) apart
PART_BYTES=15000000 # under the 16 MiB a returned file may have
PARTS_PER_CALL=4    # 4 x 15 MB stays under the 64 MiB that one call returns

case "$MODE" in
pack)
    DIR=${2:-out/devset_gpu}
    [ -f "$DIR/inputs.json" ] || { echo "$DIR has no inputs.json: run evaluate --phase inputs first" >&2; exit 2; }
    rm -rf "$PAYLOAD" && mkdir -p "$PAYLOAD"
    cp "$DIR/inputs.json" "$PAYLOAD/"
    for bundle in "$DIR"/*/bundle; do
        name=$(basename "$(dirname "$bundle")")
        mkdir -p "$PAYLOAD/$name" && cp -r "$bundle" "$PAYLOAD/$name/"
    done
    echo "$PAYLOAD: $(du -sb "$PAYLOAD" | cut -f1) bytes ($(du -sh "$PAYLOAD" | cut -f1)) for $(ls -d "$PAYLOAD"/*/ | wc -l) assets"
    ;;
run)
    LIMIT=${2:-560}
    if [ -d .whl ] && ! python -c "import safetensors, OpenEXR, PIL, psutil, xatlas, fast_simplification, skimage, pygltflib" 2>/dev/null; then
        python -m pip install --quiet --no-index --no-deps .whl/*.whl
    fi
    export PYTHONPATH=$PWD
    mkdir -p "$RUN/logs"
    EXTRA=()
    if [ -n "${CHECKPOINT:-}" ]; then EXTRA=(--checkpoint "$CHECKPOINT"); fi
    read -ra HIGH <<< "${HIGH_ASSETS:-barrel synthetic_1}"
    left() { echo $((LIMIT - SECONDS)); }
    reconstruct() { # reconstruct SECONDS_PER_OBJECT ARGS...: start no object that could not finish in time
        local per=$1; shift
        [ "$(left)" -gt 10 ] || return 0
        timeout "$(left)" python bench/devset_reconstruct.py "$PAYLOAD" --out "$RUN" "${EXTRA[@]}" \
            --deadline-s "$(($(left) - per))" "$@" || true
    }
    lane_0() { # standard on every asset, then high on the second HIGH asset
        reconstruct 110 --presets standard
        if [ "${#HIGH[@]}" -gt 1 ]; then reconstruct 300 --presets high --assets "${HIGH[@]:1}"; fi
    }
    lane_1() { # fast on every asset, the profile once, then high on the first HIGH asset
        reconstruct 40 --presets fast
        if [ ! -f "$RUN/profile/profile.json" ] && [ "$(left)" -gt 200 ]; then
            timeout "$(left)" python bench/profile_refine.py --preset standard --device cuda --out "$RUN/profile" || true
        fi
        reconstruct 300 --presets high --assets "${HIGH[0]}"
    }
    GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
    nvidia-smi --query-gpu=name,memory.total --format=csv > "$RUN/logs/gpus.csv" || true
    if [ "$GPUS" -ge 2 ]; then
        CUDA_VISIBLE_DEVICES=0 lane_0 >> "$RUN/logs/gpu0.log" 2>&1 &
        CUDA_VISIBLE_DEVICES=1 lane_1 >> "$RUN/logs/gpu1.log" 2>&1 &
        wait
    else
        { lane_0; lane_1; } >> "$RUN/logs/gpu0.log" 2>&1
    fi
    tail -n 30 "$RUN"/logs/gpu*.log
    ls -la "$RUN"/*/
    ;;
return)
    DEST=${2:?usage: scripts/devset_gpu.sh return DEST [FIRST]}
    FIRST=${3:-1}
    PARTS=$RUN.parts
    if [ "$FIRST" -eq 1 ]; then # pack once; later calls copy the next parts
        rm -rf "$PARTS" && mkdir -p "$PARTS"
        tar -C "$RUN" --exclude=trace.json -cf - . | split -b "$PART_BYTES" - "$PARTS/run.tar.part-"
        (cd "$PARTS" && sha256sum run.tar.part-* > SHA256SUMS)
    fi
    mapfile -t ALL < <(ls "$PARTS"/run.tar.part-*)
    mkdir -p "$DEST"
    cp "$PARTS/SHA256SUMS" "$DEST/"
    for part in "${ALL[@]:$((FIRST - 1)):$PARTS_PER_CALL}"; do cp "$part" "$DEST/"; done
    NEXT=$((FIRST + PARTS_PER_CALL))
    LAST=$((NEXT - 1 < ${#ALL[@]} ? NEXT - 1 : ${#ALL[@]}))
    echo "parts $FIRST..$LAST of ${#ALL[@]} copied to $DEST"
    if [ "$NEXT" -le "${#ALL[@]}" ]; then echo "next: scripts/devset_gpu.sh return \$OUT $NEXT"; fi
    ;;
unpack)
    TARGET=${2:?usage: scripts/devset_gpu.sh unpack RUN PARTS_DIR...}
    shift 2
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    shopt -s nullglob
    for dir in "$@"; do cp "$dir"/run.tar.part-* "$dir"/SHA256SUMS "$WORK/"; done
    (cd "$WORK" && sha256sum --check --quiet SHA256SUMS)
    mkdir -p "$TARGET"
    cat "$WORK"/run.tar.part-* | tar -C "$TARGET" -xf -
    ls -la "$TARGET"/*/
    ;;
*)
    echo "usage: scripts/devset_gpu.sh pack [DIR] | run [SECONDS] | return DEST [FIRST] | unpack RUN PARTS_DIR..." >&2
    exit 2
    ;;
esac

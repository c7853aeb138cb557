#!/usr/bin/env bash
# Training-speed benchmark for a GPU machine:  OUT=/some/dir bash bench/gpu.sh   (OUT defaults to ./out/gpu)
#
# Runs bench/model.py from the repository root: our MlpMixer and timm's, eager and torch.compile'd (whole model),
# B/16, L/16 and H/14 at 224, each model in its own training script's bf16 recipe (ours: DeepSpeed's bf16 mode,
# timm: --amp), then a DeepSpeed ZeRO-1 row per variant when deepspeed imports, then each model in the other's
# recipe. Writes $OUT/bench.json and
# $OUT/table.txt (both rewritten after every row, so a stopped run keeps what it finished), $OUT/bench.log and
# $OUT/env.txt, and prints the table. Rows not started within BUDGET seconds are skipped; the whole run is stopped
# after LIMIT seconds.
# Without a CUDA device it runs the tiny variant on CPU instead. Installs nothing.
#
# Then bench/train_e2e.py (E2E=0 skips it): the trainer end to end per variant in E2E_VARIANTS (B/16,L/16), views
# made on the device (8 loader processes) and on the CPU (10), each row stopped after E2E_LIMIT (240) seconds;
# $OUT/e2e-*.json. MODEL=0 skips bench/model.py. On a device image without DeepSpeed, carry it as wheels (see
# bench/RESULTS.md); its FusedAdam is built on the first engine (30 s).
#
# Overrides: PYTHON, VARIANTS (B/16,L/16,H/14), BATCH (512,256,128), BUDGET (390), LIMIT (465). The defaults keep the
# script under 8 minutes on an H200: the main and DeepSpeed rows take about 6, then the B/16 cross-recipe rows fit;
# BUDGET=470 LIMIT=560 also fits L/16's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT="${OUT:-./out/gpu}"
mkdir -p "$OUT" || exit 2
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# Fewer fragmentation OOMs when rows of different sizes follow each other in one process.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOG="$OUT/bench.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# One interpreter start for every question about the environment: importing torch is the slow part.
if ! PROBE="$("$PYTHON" -c "
import shlex, sys, torch, timm
cuda = torch.cuda.is_available()
print('CUDA=' + ('1' if cuda else '0'))
print('CARD=' + shlex.quote(torch.cuda.get_device_name(0) if cuda else 'none (CPU run)'))
print('TORCH_VERSION=' + torch.__version__)
print('PY_VERSION=' + sys.version.split()[0])
print('TIMM_VERSION=' + timm.__version__)
print('CUDA_VERSION=' + str(torch.version.cuda))
" 2>> "$LOG")"; then
    say "error: $PYTHON cannot import torch and timm (see $LOG)"
    exit 2
fi
eval "$PROBE"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "python $PY_VERSION | torch $TORCH_VERSION | cuda $CUDA_VERSION | timm $TIMM_VERSION"
    nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
} > "$OUT/env.txt" 2>&1

if [ "$CUDA" = 1 ]; then
    ARGS=(--device cuda --variants "${VARIANTS:-B/16,L/16,H/14}" --batch "${BATCH:-512,256,128}"
          --compile-scope model --cross --time-budget "${BUDGET:-390}")
    LIMIT="${LIMIT:-465}"
else
    ARGS=(--device cpu --threads 1 --variants tiny --image-size 32 --batch 32 --time-budget "${BUDGET:-240}")
    LIMIT="${LIMIT:-300}"
fi
say "card: $CARD | torch $TORCH_VERSION | $(date -u +%Y-%m-%dT%H:%M:%SZ) | out: $OUT"

rc=0
if [ "${MODEL:-1}" != 0 ]; then
    rm -f "$OUT/bench.json" "$OUT/table.txt"
    timeout -k 15 "$LIMIT" "$PYTHON" bench/model.py "${ARGS[@]}" --json "$OUT/bench.json" --table "$OUT/table.txt" 2>&1 \
        | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "bench/model.py ran past ${LIMIT}s and was stopped; the rows it finished are in $OUT/bench.json"
    elif [ "$rc" -ne 0 ]; then
        say "bench/model.py exited with $rc (see $LOG)"
    fi

    if [ -s "$OUT/table.txt" ]; then
        # bench/model.py prints this table at its end (exit 0, or 1 when a row failed); a killed run did not get there.
        if [ "$rc" -gt 1 ]; then echo; cat "$OUT/table.txt"; fi
    else
        say "no rows: bench/model.py wrote no $OUT/table.txt"
        [ "$rc" -eq 0 ] && rc=1
    fi
fi
# The trainer end to end (bench/train_e2e.py): shards -> the i21k augmentation -> DeepSpeed ZeRO-1 bf16 compiled ->
# optimizer steps, against the bare step, per variant with the views made on the CPU (10 loader processes) and on
# the device; on a GPU the first row also measures each knob of the lean engine step. On CPU: the tiny variant once.
if [ "${E2E:-1}" != 0 ]; then
    if [ "$CUDA" = 1 ]; then
        ROWS=()
        for v in $(echo "${E2E_VARIANTS:-B/16,L/16}" | tr ',' ' '); do ROWS+=("$v gpu" "$v cpu"); done
        knobs=--knobs
    else
        ROWS=("tiny cpu")
        knobs=
    fi
    for row in "${ROWS[@]}"; do
        read -r variant decode <<< "$row"
        name="e2e-${variant//\//}-$decode"
        say "train_e2e: $variant, views on the $decode${knobs:+, with the knobs}"
        # The CPU path at 10 loader processes, the issue's cores per GPU; data.streams (twice the processes) must
        # divide the batch, hence 320.
        cpu_path=()
        [ "$CUDA" = 1 ] && [ "$decode" = cpu ] && cpu_path=(--loader-workers 10 --batch 320)
        timeout -k 15 "${E2E_LIMIT:-240}" "$PYTHON" bench/train_e2e.py --variant "$variant" --decode "$decode" \
            "${cpu_path[@]}" $knobs --json "$OUT/$name.json" 2>&1 | grep -v -E "^\[|WARNING|INFO" | tee -a "$LOG"
        [ "${PIPESTATUS[0]}" -eq 0 ] || { say "train_e2e $variant $decode failed (see $LOG)"; [ "$rc" -eq 0 ] && rc=1; }
        knobs=
    done
fi
exit "$rc"

#!/usr/bin/env bash
# Every GPU measurement and check of README, in one go on one CUDA machine.
#
#   OUT=results_dir FMNIST=/path/to/fashion-mnist OLD_SRC=/path/to/old/src bash benchmarks/gpu_checks.sh
#
# OUT: where JSON lines, logs and the teacher run go (default bench_results/gpu).
# FMNIST: the Fashion-MNIST IDX folder (for the shared teacher); skipped when unset.
# OLD_SRC: a src/ folder of an earlier distillkit, timed beside the current engine; optional.
# SRC: the src/ folder to measure (default ./src).
# Each stage has its own time limit, so one failing or slow stage does not take the others down.
set -u
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${SRC:-$PWD/src}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
stage() { echo "=== $1 $(date -u +%H:%M:%S)"; }

stage machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"

base=()
if [ -n "${OLD_SRC:-}" ]; then base=(--baseline-src "$OLD_SRC"); fi
speed() {  # engine_speed on synthetic CIFAR-shaped data, appending to OUT/engine_speed.jsonl
    timeout "$1" $PY benchmarks/engine_speed.py --device cuda --synthetic 20000 --samples 20000 \
        --out "$OUT/engine_speed.jsonl" "${@:2}" || echo "stage failed: $?"
}

stage "speed resnet20, batch 512"
speed 75 --repeats 3 --batch-size 512 --models resnet20 --rows hand_plain,hand_tuned,distillkit "${base[@]}"
stage "speed KD resnet32x4 -> resnet8x4, batch 128 (the default batch)"
speed 75 --repeats 3 --batch-size 128 --models 'resnet32x4>resnet8x4' --rows hand_tuned,distillkit "${base[@]}"
stage "speed KD resnet32x4 -> resnet8x4, batch 512"
speed 75 --repeats 3 --batch-size 512 --models 'resnet32x4>resnet8x4' --rows hand_tuned,distillkit
speed 60 --repeats 2 --batch-size 512 --models 'resnet32x4>resnet8x4' --rows distillkit "${base[@]}"
stage "speed resnet20, batch 512, compiled"
speed 100 --repeats 3 --batch-size 512 --models resnet20 --compile --rows distillkit,distillkit_compile

stage "CUDA tests and the shared Fashion-MNIST teacher, side by side"
timeout 300 $PY -m pytest -q -x tests/test_cuda.py >"$OUT/test_cuda.log" 2>&1 &
tests=$!
if [ -n "${FMNIST:-}" ]; then
    timeout 300 $PY -m distillkit train model=resnet20 dataset=fashion-mnist "data_dir=$FMNIST" \
        epochs=30 lr=0.1 warmup_epochs=1 seed=0 device=cuda quiet=true \
        name=fmnist_resnet20 "out_dir=$OUT/fmnist_resnet20" >"$OUT/teacher.log" 2>&1 \
        || echo "teacher failed: $?"
    tail -3 "$OUT/teacher.log"
fi
wait $tests
echo "tests exit $?"
tail -15 "$OUT/test_cuda.log"
stage done

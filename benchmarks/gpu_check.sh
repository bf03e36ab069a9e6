#!/usr/bin/env bash
# Issue 13's GPU part as one prepared command, sized for a 15-minute device lease
# (its steps' limits add up to 12 minutes). Run from the repository root on a machine whose
# python3 has a CUDA build of torch (and pytest); hdqt need not be installed:
#
#     bash benchmarks/gpu_check.sh            # writes its logs to $OUT (default gpu_check/)
#     DEVICE=cpu ROUNDS=1 bash benchmarks/gpu_check.sh   # the same steps on a CPU: checks the script
#
# 1. the machine: nvidia-smi, torch and CUDA versions, the commit;
# 2. every test that takes a device, on CUDA (the CPU legs are deselected: CI runs them):
#    packing and saved memory, autocast and TF32, every learner trains there and resumes
#    on the CPU, and the CLI's device checks;
# 3. a CL run on the GPU end to end: hdqt run on the embedded digits (iCaRL, hdqt);
# 4. timings: bench_engine.py --device cuda (FCNet, the conv, ResNet-32; hdqt, int, luq
#    against fp32) and bench_memory.py --device cuda (saved bytes and allocator peaks).
# Each step has its own time limit, so one that hangs does not cost the others.
# Put in the README (section "On a GPU"): the GPU's name, the commit, and the ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
dev="${DEVICE:-cuda}"
rounds="${ROUNDS:-7}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run it with a limit, log to $out/NAME.txt, keep going
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.txt"
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
                                  'GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    git log -1 --format='commit %h %s' 2>/dev/null || echo "commit: not a git checkout"
} | tee "$out/machine.txt"
step tests 300 "$py" -m pytest -q -p no:cacheprovider -rs -k "cuda or device" \
    tests/quantization/test_packing.py tests/quantization/test_backward_memory.py \
    tests/quantization/test_mixed_precision.py tests/cl/test_learners_on_device.py \
    tests/experiments/test_cli.py tests/experiments/test_config.py
step run 120 "$py" -m hdqt run --dataset digits --method icarl --recipe hdqt --epochs 4 --seed 0 \
    --device "$dev" --out "$out/run"
step bench_engine 200 "$py" benchmarks/bench_engine.py --device "$dev" --cases fcnet,conv,resnet32 \
    --recipes fp32,hdqt,int,luq --rounds "$rounds"
step bench_memory 90 "$py" benchmarks/bench_memory.py --device "$dev" --recipes fp32,hdqt,int,luq
exit $status

#!/usr/bin/env bash
# The device call (issues 13 and 14), run from the repository root on the GPU machine with `.devdata` carried
# (`python benchmarks/prepare_device.py` here first). Everything comes back under $OUT: the GPU's description, the log
# and device_check.json, which is rewritten after every row, so a call stopped at its limit keeps what it measured.
# Extra arguments go to device_check.py, e.g. a second call that runs what the first skipped:
#   cp <first call's device_check.json> .devdata/ && bash benchmarks/device_run.sh --resume .devdata/device_check.json
set -uo pipefail
out="${OUT:-/tmp/device-out}"; mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/.devdata/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" RBLAB_DATA="$PWD/.devdata" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1 || true
"$py" - <<'EOF' 2>&1 | tee "$out/environment.txt"
import platform, sys, torch, pyautoattack, robustbench_lab
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
print('pyautoattack from', pyautoattack.__file__, '| robustbench_lab from', robustbench_lab.__file__)
EOF
"$py" benchmarks/device_check.py --out "$out/device_check.json" "$@" 2>&1 | tee "$out/device_check.log"

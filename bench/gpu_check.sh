#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA 12 device (sized for 16 cores and an H200:
# about 8 minutes): install the package with its GPU and test extras (the CUDA 12 CuPy wheel),
# run the GPU tests, then a full-size night (one science frame) stage by stage as Argo runs it,
# first on the CPU and then with the pixel kernels on CuPy (GPPY_DEVICE=gpu), and print the
# bench-full table of both side by side. The GPU pass redoes only the stages that have a GPU
# path (masters, reduce, subtract) on a copy of the CPU pass's products; the others are
# CPU stages and are shown once. astroscrappy and HOTPANTS alone are left out for time (make
# bench-full has them); the external tools inside the stages are still timed.
#
#   bash bench/gpu_check.sh            # figures and logs under $OUT (or /tmp/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/gpu-check}
NIGHT_DIR=${GPU_CHECK_NIGHT:-/tmp/fullnight1}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
say() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

say "machine"
nproc
grep -m1 'model name' /proc/cpuinfo || true
free -g | head -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

say "install"
# offline (a lent machine reaches nothing outside), pip can still install the package itself on
# what is there; the check then goes on and says what is missing rather than stop here
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" -e '.[gpu,test]' >>"$OUT_DIR/pip.log" 2>&1; }
: >"$OUT_DIR/pip.log"
pip_install || pip_install --no-build-isolation --no-deps || { echo "pip install failed (offline?): going on with what is installed"; tail -3 "$OUT_DIR/pip.log"; }
missing=""
for b in source-extractor scamp missfits; do command -v "$b" >/dev/null || missing="$missing $b"; done
command -v swarp >/dev/null || command -v SWarp >/dev/null || missing="$missing swarp"
if [ -n "$missing" ]; then
  echo "installing the astromatic tools (missing:$missing)"
  make deps-debian >/dev/null || echo "could not install:$missing (the chain's astrometry and stack need them)"
fi
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"

say "GPU tests (pytest -m gpu)"
set +e
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest-gpu.log" | tail -15
gpu_tests=${PIPESTATUS[0]}
set -e

say "full-size night, CPU"
CHAIN=plan,masters,reduce,astrometry,photometry,stack,subtract
GPPY_DEVICE=cpu "$PY" bench/bench_full.py --night-dir "$NIGHT_DIR" --n-science 1 --work /tmp/gpu-check-cpu \
  --stages "$CHAIN" --no-yardsticks --json "$OUT_DIR/bench-cpu.json" 2>&1 | tee "$OUT_DIR/bench-cpu.log" | tail -12

say "full-size night, GPU (masters, reduce, subtract on CuPy)"
rm -rf /tmp/gpu-check-gpu
cp -a /tmp/gpu-check-cpu /tmp/gpu-check-gpu
GPPY_DEVICE=gpu "$PY" bench/bench_full.py --night-dir "$NIGHT_DIR" --n-science 1 --work /tmp/gpu-check-gpu \
  --stages masters,reduce,subtract --no-yardsticks --json "$OUT_DIR/bench-gpu.json" 2>&1 | tee "$OUT_DIR/bench-gpu.log" | tail -8
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true

say "CPU and GPU side by side"
"$PY" - "$OUT_DIR/bench-cpu.json" "$OUT_DIR/bench-gpu.json" <<'EOF'
import json, sys

cpu, gpu = (json.load(open(p)) for p in sys.argv[1:3])
rows_gpu = {r["stage"]: r for r in gpu["stages"]}
m = cpu["machine"]
print(f"night {cpu['size']} px, {cpu['frames']} science frame(s); {m['cores']} cores {m['cpu']}, "
      f"{m['ram_gib']} GiB RAM; GPU {gpu['machine'].get('gpu', '?')}")
print(f"{'stage':<11} {'CPU s':>8} {'CPU GiB':>8} {'GPU s':>8} {'GPU GiB':>8} {'speed-up':>8} {'request':>8}  tools (CPU pass)")
chain_cpu = chain_gpu = 0.0
for r in cpu["stages"]:
    g = rows_gpu.get(r["stage"])
    gs, gm = (g["max_s"], g["peak_gib"]) if g else (r["max_s"], r["peak_gib"])
    if r["stage"] in ("reduce", "astrometry", "photometry"):
        chain_cpu += r["max_s"]
        chain_gpu += gs
    tools = f"{r['tool_s_max']} s, x{r['x_tools']}" if r.get("x_tools") else "-"
    extra = "; ".join(f"{k[2:]} alone {r[k[2:] + '_s']} s" for k in r if k.startswith("x_") and k != "x_tools")
    mark = "" if g else "  (CPU stage)"
    print(f"{r['stage']:<11} {r['max_s']:8.1f} {r['peak_gib']:8.2f} {gs:8.1f} {gm:8.2f} "
          f"{r['max_s'] / gs if gs else float('nan'):8.2f} {r['request']:>8}  {tools} {extra}{mark}")
print(f"per-frame chain (reduce + astrometry + photometry): CPU {chain_cpu:.1f} s, GPU {chain_gpu:.1f} s")
EOF
echo
echo "GPU tests exit code: $gpu_tests; figures in $OUT_DIR"
exit "$gpu_tests"

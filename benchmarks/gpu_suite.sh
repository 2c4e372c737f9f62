#!/usr/bin/env bash
# The GPU suite: on a machine with an NVIDIA GPU (the lent H100/H200: torch, triton, nvcc,
# compute-sanitizer, no internet), build ddpo_fast for sm_90, run the tests (GPU tests included),
# run compute-sanitizer over every CUDA entry point, run the op benchmarks and measure the kernels'
# bandwidth against a device-to-device copy. Logs go under $OUT; a short
# summary table is printed last (and written to $OUT/summary.txt). Default OUT: /tmp/ddpo_gpu_suite.
#
#   bash benchmarks/gpu_suite.sh                      # every step
#   bash benchmarks/gpu_suite.sh build test           # some steps: env build test sanitize bench kernelbw
#   bash benchmarks/gpu_suite.sh env rewards          # the paper-size reward benchmark (not a default step)
#
# Everything may not fit in one 10-minute device call: then split it, e.g. `env build test` and
# `build sanitize bench kernelbw` (the build is incremental while the machine stays warm).
#
# Environment: OUT (log folder), PYTHON (default python3), SUITE_BUDGET_S (seconds for the whole run,
# default 570: each step is cut off at what is left so that the summary always prints; the device
# tool allows 600 s per command), DDPO_FAST_CUDA_ARCHS (default 90), PYTEST_ARGS (default "tests").
# Wheels in .whl/ (made by ../shared/device/prepare-wheels.sh) are installed into /tmp/site first.
# Files under $OUT (8 at most, for the device tool): build.log test.log sanitize.log bench.log
# kernelbw.log bench_ops.csv kernelbw.csv summary.txt (rewards.log with the rewards step).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/ddpo_gpu_suite}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export DDPO_FAST_CUDA_ARCHS="${DDPO_FAST_CUDA_ARCHS:-90}"
SUITE_START=$(date +%s)
DEADLINE=$((SUITE_START + ${SUITE_BUDGET_S:-570}))
NOTE_FILE=$(mktemp)

ALL_STEPS=(env build test sanitize bench kernelbw)
if [ $# -gt 0 ]; then STEPS=("$@"); else STEPS=("${ALL_STEPS[@]}"); fi

declare -a R_NAME=() R_STATUS=() R_SECS=() R_NOTE=()

note() { printf '%s' "$*" > "$NOTE_FILE"; }

# run_step NAME LOGFILE FUNCTION: runs FUNCTION with its output appended to LOGFILE, under the time
# that is left, and records status, seconds and the note the function left.
run_step() {
  local name=$1 log=$2 fn=$3
  local now left start rc status
  now=$(date +%s)
  left=$((DEADLINE - now - 15))
  : > "$NOTE_FILE"
  if [ "$left" -lt 20 ]; then
    R_NAME+=("$name"); R_STATUS+=("SKIP"); R_SECS+=(0); R_NOTE+=("no time left in SUITE_BUDGET_S")
    echo "=== [$name] skipped: no time left"
    return
  fi
  echo "=== [$name] $(date -u +%H:%M:%S) (log: $log, at most ${left}s)"
  start=$(date +%s)
  {
    echo "=== [$name] $(date -u) ==="
    STEP_LEFT=$left "$fn"
  } >> "$log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then status=ok; elif [ "$rc" -eq 124 ]; then status=TIMEOUT; else status=FAIL; fi
  R_NAME+=("$name"); R_STATUS+=("$status"); R_SECS+=($(( $(date +%s) - start ))); R_NOTE+=("$(cat "$NOTE_FILE")")
  echo "=== [$name] $status (rc=$rc) after $(( $(date +%s) - start ))s"
  tail -n 5 "$log" | sed 's/^/    /'
}

# t SECONDS CMD...: a command cut off at min(SECONDS, what is left of the step).
t() {
  local cap=$1; shift
  local left=$((STEP_LEFT - ($(date +%s) - STEP_START)))
  [ "$cap" -gt "$left" ] && cap=$left
  [ "$cap" -lt 5 ] && cap=5
  timeout --signal=TERM --kill-after=10 "$cap" "$@"
}

# ---- Steps -----------------------------------------------------------------------------------------

step_env() {
  STEP_START=$(date +%s)
  nvidia-smi || true
  nvcc --version || true
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true
  "$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton: not importable:", e)
EOF
  note "$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    note "torch sees no GPU"; return 1; }
}

step_build() {
  STEP_START=$(date +%s)
  echo "DDPO_FAST_CUDA=1 DDPO_FAST_CUDA_ARCHS=$DDPO_FAST_CUDA_ARCHS pip install --no-build-isolation --no-deps -e ."
  local start=$(date +%s)
  DDPO_FAST_CUDA=1 t 480 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . || {
    note "pip install -e . failed (see build.log)"; return 1; }
  local secs=$(( $(date +%s) - start ))
  "$PY" - <<'EOF' || { note "ddpo_fast._C not built with CUDA"; return 1; }
from ddpo_fast import _C
from ddpo_fast.backends import cuda_kernels_built
print("ddpo_fast._C:", _C.__file__, "built_with_cuda:", _C.built_with_cuda())
assert cuda_kernels_built()
EOF
  note "_C with CUDA (sm_$DDPO_FAST_CUDA_ARCHS) in ${secs}s"
}

step_test() {
  STEP_START=$(date +%s)
  # shellcheck disable=SC2086
  DDPO_FAST_REQUIRE_CUDA=1 t 3600 "$PY" -m pytest -q -ra -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-tests}
  local rc=$?
  local summary
  summary=$(grep -E '(passed|failed|error|skipped)( in |,)' "$OUT/test.log" | tail -n 1 \
    | sed -E 's/=+//g; s/^ +| +$//g')
  note "${summary:-no pytest summary line (rc=$rc)}"
  return $rc
}

write_sanitize_probe() {
  cat > /tmp/ddpo_sanitize_probe.py <<'EOF'
"""Every CUDA entry point once, on small shapes: both load paths, CFG, clipping, PPO, float64."""
import torch
from ddpo_fast import ops

torch.manual_seed(0)
dev = torch.device("cuda")
with ops.use_backend("cuda"):
    for dtype, chw, cfg in ((torch.bfloat16, (4, 16, 16), True), (torch.float32, (3, 7, 5), False),
                            (torch.float64, (2, 4, 8), True)):
        B = 3
        m = torch.randn((2 * B if cfg else B, *chw), dtype=dtype, device=dev, requires_grad=True)
        x = torch.randn((B, *chw), dtype=dtype, device=dev)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        a = torch.tensor([0.005, 0.5, 0.9983], dtype=cdt, device=dev)
        p = torch.tensor([0.007, 0.6, 1.0], dtype=cdt, device=dev)
        kw = dict(guidance_scale=7.5 if cfg else None, clip_sample_range=1.0, use_clipped_model_output=cfg)
        prev, lp = ops.ddim_step_logprob(m, x, a, p, seed=1, offset=2, **kw)                      # forward, Philox
        (prev.float().sum() + lp.sum()).backward()                                                # backward
        prev2, _ = ops.ddim_step_logprob(m, x, a, p, noise=torch.randn_like(x), **kw)              # forward, noise
        lp2 = ops.ddim_step_logprob(m, x, a, p, prev_sample=prev.detach(), **kw)[1]                # log-prob only
        old = lp2.detach() + 0.01
        adv = torch.randn(B, dtype=cdt, device=dev)
        loss, _ = ops.ddim_ppo_loss(m, x, prev.detach(), a, p, old, adv, clip_range=1e-4, adv_clip_max=5.0, **kw)
        loss.backward()                                                                    # forward + PPO, backward
        lpl = lp2.detach().clone().requires_grad_(True)
        loss2, _ = ops.ppo_clip_loss(lpl, old, adv, 0.2, 5.0)                                      # PPO alone
        loss2.backward()
    # A misaligned (scalar path) sample and a partial last chunk.
    x = torch.randn(2 * 4100 + 1, device=dev)[1:].view(2, 4100)
    m = torch.randn(2, 4100, device=dev)
    ops.ddim_step_logprob(m, x, 0.3, 0.4, seed=3)
torch.cuda.synchronize()
print("probe done")
EOF
}

step_sanitize() {
  STEP_START=$(date +%s)
  local cs
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  write_sanitize_probe
  local results="" failed=0 tool rc
  for tool in memcheck racecheck initcheck; do
    echo "--- compute-sanitizer --tool $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 t 240 "$cs" --tool "$tool" --error-exitcode 9 --print-limit 20 \
      "$PY" /tmp/ddpo_sanitize_probe.py
    rc=$?
    if [ "$rc" -eq 0 ]; then results+="$tool ok, "; else results+="$tool rc=$rc, "; failed=1; fi
  done
  note "${results%, }"
  return $failed
}

step_bench() {
  STEP_START=$(date +%s)
  t 400 "$PY" benchmarks/ops.py --device cuda --csv "$OUT/bench_ops.csv"
  local rc=$?
  note "benchmarks/ops.py --device cuda (rc=$rc) -> bench_ops.csv"
  return $rc
}

# Not in the default steps (it needs most of a 10-minute call alone): the rewards at the paper's sizes
# (CLIP ViT-L/14 + LAION MLP, LLaVA-1.5-7B + RoBERTa-large, random weights built on the GPU, bf16).
step_rewards() {
  STEP_START=$(date +%s)
  t 560 "$PY" benchmarks/rewards.py --full-size --device cuda:0 --size 512 --batch 8 --csv /tmp/ddpo_rewards_gpu.csv
  local rc=$?
  note "benchmarks/rewards.py --full-size (rc=$rc): table in rewards.log"
  return $rc
}

write_kernelbw() {
  cat > /tmp/ddpo_kernelbw.py <<'EOF'
"""Bandwidth of the CUDA kernels against a device-to-device copy of the same bytes.

Each case runs the kernels through the backend runner (no Python-side validation), rotating over
enough buffer sets that the data does not stay in L2. Times: 'kernel' is the main kernel's device time
(torch.profiler), 'step' the whole entry point (main kernel + finalize) per call from CUDA-graph replay.
Bytes: every input read once and every output written once. Copy: torch copy_ of half those bytes
(read + write), same rotation, same timing methods."""
import csv
import math
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ddpo_fast import backends
from ddpo_fast.backends import DdimCall

dev = torch.device("cuda")
L2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
runner = backends.runner("cuda")
SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def make_case(kind, B, N, dtype, cfg):
    rows = 2 * B if cfg else B
    m = torch.randn(rows, N, device=dev).to(dtype)
    x = torch.randn(B, N, device=dev).to(dtype)
    a = torch.full((B,), 0.3, device=dev)
    p = torch.full((B,), 0.4, device=dev)
    prev = torch.randn(B, N, device=dev).to(dtype)
    common = dict(model_output=m, sample=x, alpha_t=a, alpha_prev=p, prev_sample=prev, eta=1.0,
                  guidance_scale=7.5 if cfg else None)
    s = SIZE[dtype]
    if kind == "sample":
        call = DdimCall(log_prob=torch.empty(B, device=dev), sample_noise=True, seed=1, offset=2, **common)
        nbytes = (rows * N + B * N + B * N) * s
        return call, runner.forward, nbytes
    if kind == "logprob":
        call = DdimCall(log_prob=torch.empty(B, device=dev), **common)
        nbytes = (rows * N + 2 * B * N) * s
        return call, runner.forward, nbytes
    call = DdimCall(grad_log_prob=torch.randn(B, device=dev), grad_model_output=torch.empty_like(m), **common)
    nbytes = (rows * N + 2 * B * N + rows * N) * s
    return call, runner.backward, nbytes


def graph_time(fns, reps=20):
    """Seconds per call of fns (one call each) replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(fns)))
    return sorted(times)[len(times) // 2]


def profiled_us(fns, pattern, reps=10):
    """Median device time (us) of the kernels whose name contains `pattern`."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for fn in fns:
                fn()
        torch.cuda.synchronize()
    durs = []
    for e in prof.events():
        if pattern in e.name and str(getattr(e, "device_type", "CUDA")).endswith("CUDA"):
            durs.append(e.time_range.elapsed_us())
    durs.sort()
    return durs[len(durs) // 2] if durs else float("nan")


def rotation(nbytes):
    return max(2, math.ceil(3 * L2 / nbytes))


def measure(label, kind, B, N, dtype, cfg):
    _, _, nbytes = make_case(kind, B, N, dtype, cfg)
    sets = [make_case(kind, B, N, dtype, cfg) for _ in range(rotation(nbytes))]
    fns = [(lambda c=c, f=f: f(c)) for c, f, _ in sets]
    kernel = "ddim_backward_kernel" if kind == "backward" else "ddim_forward_kernel"
    k_us = profiled_us(fns, kernel)
    fin_us = profiled_us(fns, "finalize_kernel") if kind != "backward" else 0.0
    step_s = graph_time(fns)
    half = nbytes // 2
    copies = [(torch.empty(half, dtype=torch.uint8, device=dev), torch.empty(half, dtype=torch.uint8, device=dev))
              for _ in range(rotation(nbytes))]
    cfns = [(lambda d=d, s=s: d.copy_(s)) for d, s in copies]
    copy_s = graph_time(cfns)
    copy_k_us = profiled_us(cfns, "Memcpy")
    if math.isnan(copy_k_us):
        copy_k_us = profiled_us(cfns, "copy")
    row = dict(case=label, bytes=nbytes, kernel_us=k_us, finalize_us=fin_us, step_us=step_s * 1e6,
               kernel_GBps=nbytes / (k_us * 1e-6) / 1e9 if k_us == k_us else float("nan"),
               step_GBps=nbytes / step_s / 1e9, copy_us=copy_k_us, copy_step_us=copy_s * 1e6,
               copy_GBps=nbytes / (copy_k_us * 1e-6) / 1e9 if copy_k_us == copy_k_us else nbytes / copy_s / 1e9)
    row["kernel_vs_copy"] = row["kernel_GBps"] / row["copy_GBps"]
    row["step_vs_copy"] = row["step_GBps"] / (nbytes / copy_s / 1e9)
    del sets, copies
    torch.cuda.empty_cache()
    return row


def big_copy_GBps(megabytes=1024):
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    s = graph_time([lambda: dst.copy_(src)], reps=10)
    return 2 * src.numel() / s / 1e9


def main(csv_path):
    N = 4 * 64 * 64
    cases = [
        ("sample fp32 B32", "sample", 32, N, torch.float32, False),
        ("sample fp32 cfg B32", "sample", 32, N, torch.float32, True),
        ("sample bf16 cfg B32", "sample", 32, N, torch.bfloat16, True),
        ("logprob fp32 cfg B32", "logprob", 32, N, torch.float32, True),
        ("backward fp32 cfg B32", "backward", 32, N, torch.float32, True),
        ("backward bf16 cfg B32", "backward", 32, N, torch.bfloat16, True),
        ("sample fp32 cfg B32 4x128x128", "sample", 32, 4 * N, torch.float32, True),
        ("sample fp32 B256", "sample", 256, N, torch.float32, False),
    ]
    print(f"device: {torch.cuda.get_device_name(0)}; large copy (1 GiB, read+write): {big_copy_GBps():.0f} GB/s")
    rows = []
    for case in cases:
        try:
            rows.append(measure(*case))
        except Exception as e:  # noqa: BLE001
            print(f"{case[0]}: FAILED {type(e).__name__}: {e}")
    cols = ["case", "bytes", "kernel_us", "finalize_us", "step_us", "kernel_GBps", "copy_us", "copy_GBps",
            "kernel_vs_copy", "step_GBps", "step_vs_copy"]
    print(" | ".join(f"{c:>14}" if i else f"{c:<30}" for i, c in enumerate(cols)))
    for r in rows:
        print(" | ".join((f"{r[c]:<30}" if i == 0 else f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}")
                         for i, c in enumerate(cols)))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    key = next((r for r in rows if r["case"] == "sample fp32 cfg B32"), rows[0] if rows else None)
    if key:
        print(f"SUMMARY {key['case']}: kernel {key['kernel_GBps']:.0f} GB/s = {key['kernel_vs_copy']:.2f} of copy; "
              f"step {key['step_us']:.1f} us = {key['step_vs_copy']:.2f} of copy")
    return 0 if len(rows) == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
EOF
}

step_kernelbw() {
  STEP_START=$(date +%s)
  write_kernelbw
  t 300 "$PY" /tmp/ddpo_kernelbw.py "$OUT/kernelbw.csv"
  local rc=$?
  note "$(grep "^SUMMARY" "$OUT/kernelbw.log" | tail -n 1 | sed "s/^SUMMARY //")"
  return $rc
}

# ---- Run -------------------------------------------------------------------------------------------

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "=== installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site" | tee -a "$OUT/build.log"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/build.log" 2>&1 || echo "wheel install failed (see build.log)"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
for step in "${STEPS[@]}"; do
  case "$step" in
    env) run_step env "$OUT/build.log" step_env ;;
    build) run_step build "$OUT/build.log" step_build ;;
    test) run_step test "$OUT/test.log" step_test ;;
    sanitize) run_step sanitize "$OUT/sanitize.log" step_sanitize ;;
    bench) run_step bench "$OUT/bench.log" step_bench ;;
    kernelbw) run_step kernelbw "$OUT/kernelbw.log" step_kernelbw ;;
    rewards) run_step rewards "$OUT/rewards.log" step_rewards ;;
    *) echo "unknown step '$step' (steps: ${ALL_STEPS[*]})"; R_NAME+=("$step"); R_STATUS+=("FAIL"); R_SECS+=(0)
       R_NOTE+=("unknown step") ;;
  esac
done
rm -f "$NOTE_FILE"

failed=()
for i in "${!R_NAME[@]}"; do [ "${R_STATUS[$i]}" = ok ] || failed+=("${R_NAME[$i]}"); done
{
  echo "========== gpu_suite summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - SUITE_START ))s) =========="
  printf '%-10s %-8s %7s  %s\n' step status seconds note
  for i in "${!R_NAME[@]}"; do
    printf '%-10s %-8s %7s  %s\n' "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_SECS[$i]}" "${R_NOTE[$i]}"
  done
  if [ ${#failed[@]} -eq 0 ]; then echo "all steps ok"; else echo "steps not ok: ${failed[*]}"; fi
  echo "logs: $OUT"
} | tee "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]

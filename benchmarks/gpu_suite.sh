#!/usr/bin/env bash
# The GPU suite: every GPU check of ddpo_fast in ONE call of the device tool (one H200, torch +
# triton + nvcc + compute-sanitizer preinstalled, no internet), in under 8 minutes from a fresh
# machine. Steps, in order; each is cut off at what is left of a global budget (later steps keep a
# reserve), so the summary table always prints, and what gets no time is SKIPped and named:
#
#   env       GPU, driver, torch / triton / nvcc versions; the wheels of .whl/ installed (see below);
#             which of diffusers, deepspeed, transformers, peft import                              ~15 s
#   build     pip install --no-build-isolation --no-deps -e . with DDPO_FAST_CUDA=1,
#             DDPO_FAST_CUDA_ARCHS=90 and CMAKE_BUILD_PARALLEL_LEVEL = the cores; checks
#             ddpo_fast._C.built_with_cuda()                                                         ~45 s
#   test      tests/test_cuda.py under DDPO_FAST_GPU_FOCUS=1 (tests/conftest.py: every case x dtype on
#             the SD latent at batch 3, the odd 4x17x23 shape once per backend and test, and the
#             launch mechanics: graph capture, no host sync, side stream, misaligned pointers,
#             determinism, bad arguments, float64, gradcheck on two cases; 450 of 1,682 items) for
#             the cuda and triton backends, plus tests/test_triton_device.py (its two-GPU test skips
#             on one GPU). The ~280 Triton variants this compiles from a cold cache (counted on a
#             CPU by `python benchmarks/gpu_checks.py triton-variants`; ~0.6 CPU-s each, 175 s in one
#             process) are spread over min(12, cores - 4) pytest processes (DDPO_FAST_GPU_SHARD):
#             the busiest compiles ~36                                                             ~50-80 s
#   sanitize  compute-sanitizer memcheck, racecheck and initcheck, run at once, over a probe that
#             calls every entry point of both backends on small shapes                              ~30-60 s
#   graph     a 4-step CFG sampling loop (bf16 conv stand-in + the fused ddim_step_logprob, Philox
#             noise, bf16 storage) captured in a CUDA graph: replay == eager bit for bit, per backend ~20 s
#   kernelbw  the step kernels' bandwidth against a device-to-device copy (rotating buffers over L2);
#             target >= 0.80 of copy                                                                ~40 s
#   dropin    per-call time of the drop-in ddim_step_with_logprob(scheduler, ...) at B = 1, 8, 32
#             against trl's scheduler_step and torch.compile: sampling eager and in a CUDA graph,
#             training (log-prob -> PPO loss -> backward) eager; its log goes into kernelbw.log    ~40-90 s
#   e2e       python benchmarks/train.py --model sd15-random --epochs 3 --skip-trl (SD-1.5 shapes,
#             random weights, bf16, full finetune, CFG: samples/s, peak memory, MFU), then the phase
#             consistency of a tiny run with frozen weights (approx_kl, clipfrac), again with
#             compile=true when >= 100 s are left                                                  ~120-200 s
#   Total: ~5.5-7.5 minutes; SUITE_BUDGET_S (460 s, plus <= 10 s to stop a step and print) bounds it.
#
# Optional steps (not run by default; each wants most of a call): bench (benchmarks/ops.py --device
# cuda), rewards (the paper-size rewards), preference (pickscore, clipscore, hpsv2 and imagereward at
# their published sizes: CLIP ViT-H/14, ViT-L/14, BLIP ViT-L/16 + BERT-base; not yet run on a GPU),
# families (the SD3 path end to end: benchmarks/train.py --model sd35m-random, SD3.5-medium's shapes
# with random weights, bf16, 512 px, the flow SDE step; then the tiny-sdxl and tiny-sd3 phase checks).
#
# How to run it with the device tool (one call):
#   1. Here, once, from the project root: `../shared/device/prepare-wheels.sh` puts the wheels the GPU
#      image lacks (diffusers, deepspeed, bert-score and their missing dependencies, ~11 MB) into
#      .whl/ and makes .whl/ git-ignored through .git/info/exclude. Nothing else needs carrying: the
#      test step uses plain pytest processes, no pytest-xdist.
#   2. Check it here, without a GPU (~40 s): `bash benchmarks/gpu_suite.sh --dry-run`.
#   3. device `run`: command `bash benchmarks/gpu_suite.sh`, timeout_s 600, carry [".whl"].
#      Without .whl the suite still runs; the step that needs diffusers (e2e) is SKIPped, saying so.
#   4. Copy the table (printed last, also in $OUT/summary.txt) into BENCHMARKS.md.
#
#   bash benchmarks/gpu_suite.sh                 # every default step
#   bash benchmarks/gpu_suite.sh test graph      # some steps (the built _C stays while the machine is warm)
#   bash benchmarks/gpu_suite.sh --dry-run       # no GPU: each step's commands, scripts and imports exist
#
# Environment: OUT (log folder, default /tmp/ddpo_gpu_suite), PYTHON (default python3; the dry run
# takes .venv/bin/python when there is one), SUITE_BUDGET_S (seconds for the whole run, default 460:
# under 8 minutes with the summary), TEST_PROCESSES (default min(12, cores - 4)),
# DDPO_FAST_CUDA_ARCHS (default 90).
# Files under $OUT (8, the most the device tool brings back): build.log (env + build), test.log,
# sanitize.log, graph.log, kernelbw.log (and the dropin step's table), kernelbw.csv, e2e.log,
# summary.txt (bench.log / rewards.log / preference.log with those steps).
set -u
cd "$(dirname "$0")/.." || exit 1

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done
if [ "$DRY_RUN" = 1 ]; then OUT="${OUT:-/tmp/ddpo_gpu_suite_dry}"; else OUT="${OUT:-/tmp/ddpo_gpu_suite}"; fi
mkdir -p "$OUT"
rm -f "$OUT"/{build,test,sanitize,graph,kernelbw,e2e,bench,rewards,preference,families}.log "$OUT"/kernelbw.csv "$OUT"/summary.txt
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1 DDPO_FAST_NO_PROGRESS=1
export DDPO_FAST_CUDA_ARCHS="${DDPO_FAST_CUDA_ARCHS:-90}"
CORES=$(nproc 2>/dev/null || echo 4)
SUITE_START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-460}
DEADLINE=$((SUITE_START + BUDGET))
STATE=$(mktemp -d /tmp/ddpo_gpu_suite_state.XXXXXX)  # scratch: not under $OUT (8 files at most there)
NOTE_FILE="$STATE/note"
ENV_FILE="$STATE/env.txt"  # `module NAME ok|missing ...` and `fact KEY VALUE` lines from gpu_checks.py env
TEST_PATHS=(tests/test_cuda.py tests/test_flow_cuda.py tests/test_triton_device.py)

ALL_STEPS=(env build test sanitize graph kernelbw dropin e2e)
if [ ${#ARGS[@]} -gt 0 ]; then STEPS=("${ARGS[@]}"); else STEPS=("${ALL_STEPS[@]}"); fi

# Per step: the most it may take (cap, s), and what it keeps for itself against earlier steps running
# long (reserve, s): a step gets min(cap, time left - the reserves of the steps still to come).
declare -A CAP=([env]=60 [build]=180 [test]=240 [sanitize]=150 [graph]=90 [kernelbw]=120 [dropin]=120 [e2e]=330
                [bench]=300 [rewards]=560 [preference]=560 [families]=560)
declare -A RESERVE=([env]=10 [build]=40 [test]=60 [sanitize]=30 [graph]=15 [kernelbw]=30 [dropin]=20 [e2e]=150
                    [bench]=60 [rewards]=60 [preference]=60 [families]=60)
declare -A LOG=([env]=build.log [build]=build.log [test]=test.log [sanitize]=sanitize.log [graph]=graph.log
                [kernelbw]=kernelbw.log [dropin]=kernelbw.log [e2e]=e2e.log [bench]=bench.log [rewards]=rewards.log
                [preference]=preference.log [families]=families.log)

declare -a R_NAME=() R_STATUS=() R_SECS=() R_NOTE=() NO_TIME=()
STEP_START=0 STEP_LEFT=0

note() { printf '%s' "$*" | tr '|\n' '/ ' > "$NOTE_FILE"; }  # one line, no '|' (a table cell)
add_note() { local old; old=$(cat "$NOTE_FILE"); note "${old:+$old; }$*"; }

# run_step NAME: runs step_NAME (dry_NAME with --dry-run), its output appended to $OUT/LOG[NAME],
# under the time that is left; records status, seconds and the note the function left. A function
# returns 0 (ok), 77 (SKIP: a reason in the note), 124 or 137 (TIMEOUT), anything else (FAIL).
run_step() {
  local name=$1 fn later=0 s left rc status found=0
  for s in "${STEPS[@]}"; do  # the reserves of the steps after this one (env, short, always runs)
    if [ "$found" = 1 ] && [ "$name" != env ]; then later=$((later + ${RESERVE[$s]:-0})); fi
    [ "$s" = "$name" ] && found=1
  done
  left=$((DEADLINE - $(date +%s) - later))
  [ "$left" -gt "${CAP[$name]}" ] && left=${CAP[$name]}
  : > "$NOTE_FILE"
  if [ "$DRY_RUN" = 0 ] && [ "$left" -lt 15 ]; then
    R_NAME+=("$name"); R_STATUS+=("SKIP"); R_SECS+=(0); R_NOTE+=("no time left in SUITE_BUDGET_S=$BUDGET")
    NO_TIME+=("$name")
    echo "=== [$name] SKIP: no time left"
    return
  fi
  if [ "$DRY_RUN" = 1 ]; then fn="dry_$name"; else fn="step_$name"; fi
  local log="$OUT/${LOG[$name]}"
  echo "=== [$name] $(date -u +%H:%M:%S) (log: $log, at most ${left}s)"
  STEP_START=$(date +%s) STEP_LEFT=$left
  {
    echo "=== [$name] $(date -u) (at most ${left}s) ==="
    "$fn"
  } >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    77) status=SKIP ;;
    124 | 137) status=TIMEOUT; add_note "cut off after ${left}s" ;;
    *) status=FAIL ;;
  esac
  # A failure without a note: the log's last line says most.
  [ "$status" != ok ] && [ ! -s "$NOTE_FILE" ] && note "$(grep -v '^ *$' "$log" | tail -n 1 | cut -c1-200)"
  R_NAME+=("$name"); R_STATUS+=("$status"); R_SECS+=($(($(date +%s) - STEP_START))); R_NOTE+=("$(cat "$NOTE_FILE")")
  echo "=== [$name] $status (rc=$rc) after $(($(date +%s) - STEP_START))s: $(cat "$NOTE_FILE")"
  tail -n 4 "$log" | sed 's/^/    /'
}

# t SECONDS CMD...: CMD cut off at min(SECONDS, what is left of the step). timeout signals its
# whole process group, so the trainer's subprocesses end with it.
t() {
  local cap=$1 left
  shift
  left=$((STEP_LEFT - ($(date +%s) - STEP_START)))
  [ "$cap" -gt "$left" ] && cap=$left
  [ "$cap" -lt 5 ] && cap=5
  timeout --signal=TERM --kill-after=10 "$cap" "$@"
}

step_time_left() { echo $((STEP_LEFT - ($(date +%s) - STEP_START))); }

# The env facts and module checks, made once (by the env step, or on first need).
env_facts() {
  [ -s "$ENV_FILE" ] \
    || timeout 120 "$PY" benchmarks/gpu_checks.py env --no-gpu-ok --env-file "$ENV_FILE" > /dev/null 2>&1
}
module_ok() { env_facts; grep -q "^module $1 ok" "$ENV_FILE"; }
fact() { env_facts; sed -n "s/^fact $1 //p" "$ENV_FILE" | head -n 1; }

# ---- Wheels ----------------------------------------------------------------------------------------
# The GPU image lacks diffusers / deepspeed / bert-score: they travel as wheels in .whl/ (carry it) and
# go into /tmp/site, first on PYTHONPATH. The dry run checks them for Python 3.12 instead.
WHEEL_NOTE="no .whl/: make it with ../shared/device/prepare-wheels.sh and carry .whl"
N_WHEELS=$(find .whl -maxdepth 1 -type f -name '*.whl' 2> /dev/null | wc -l)
if [ "$DRY_RUN" = 0 ] && [ "$N_WHEELS" -gt 0 ]; then
  echo "=== installing $N_WHEELS wheels from .whl into /tmp/site" | tee -a "$OUT/build.log"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >> "$OUT/build.log" 2>&1; then
    WHEEL_NOTE="$N_WHEELS wheels installed"
  else
    WHEEL_NOTE="installing $N_WHEELS wheels FAILED (build.log)"
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- Steps -----------------------------------------------------------------------------------------

step_env() {
  nvidia-smi || true
  nvcc --version || true
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || true
  echo "wheels: $WHEEL_NOTE"
  t 90 "$PY" benchmarks/gpu_checks.py env --env-file "$ENV_FILE"
  local rc=$?
  local modules
  modules=$(awk '$1 == "module" { printf "%s%s %s", sep, $2, $3; sep = ", " }' "$ENV_FILE" 2> /dev/null)
  local driver nvcc_version
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -n 1)
  nvcc_version=$(nvcc --version 2> /dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  note "$(fact gpu), driver ${driver:-?}; torch $(fact torch), triton $(fact triton), nvcc ${nvcc_version:-?};" \
    "$WHEEL_NOTE; $modules"
  return $rc
}

step_build() {
  echo "DDPO_FAST_CUDA=1 DDPO_FAST_CUDA_ARCHS=$DDPO_FAST_CUDA_ARCHS CMAKE_BUILD_PARALLEL_LEVEL=$CORES" \
    "pip install --no-build-isolation --no-deps -e ."
  DDPO_FAST_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=$CORES t 600 "$PY" -m pip install -v --no-build-isolation --no-deps \
    --no-index -e . || { local rc=$?; note "pip install -e . failed (build.log)"; return $rc; }
  "$PY" -c 'from ddpo_fast import _C
print("ddpo_fast._C:", _C.__file__, "built_with_cuda:", _C.built_with_cuda())
assert _C.built_with_cuda()' || { note "ddpo_fast._C is not built with CUDA"; return 1; }
  note "_C with CUDA kernels for sm_$DDPO_FAST_CUDA_ARCHS ($CORES jobs)"
}

step_test() {
  local n=${TEST_PROCESSES:-$((CORES - 4 < 12 ? CORES - 4 : 12))} i r rc=0 pids=() counts
  [ "$n" -lt 1 ] && n=1
  # N pytest processes, each a DDPO_FAST_GPU_SHARD of the focused selection (tests/conftest.py): the
  # cold Triton compiles (~280, ~0.6 CPU-s each) spread over the cores, each (case, dtype) family of
  # Triton tests in one process so that its shared variants compile once. Plain pytest: no plugin.
  echo "DDPO_FAST_GPU_FOCUS=1 DDPO_FAST_REQUIRE_CUDA=1, $n processes (DDPO_FAST_GPU_SHARD=I/$n): ${TEST_PATHS[*]}"
  for ((i = 0; i < n; i++)); do
    DDPO_FAST_GPU_FOCUS=1 DDPO_FAST_GPU_SHARD=$i/$n DDPO_FAST_REQUIRE_CUDA=1 t 600 "$PY" -m pytest -q -ra \
      -p no:cacheprovider --durations=5 "${TEST_PATHS[@]}" > "$STATE/test_$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    r=$?
    echo "--- shard $i/$n (rc=$r)"
    cat "$STATE/test_$i.log"
    case $r in
      0 | 5) ;;  # 5: nothing collected (an empty shard)
      124 | 137) rc=124 ;;
      *) [ "$rc" -eq 0 ] && rc=$r ;;
    esac
  done
  # Sum the shards' last summary lines ("3 failed, 30 passed, 2 skipped, 1640 deselected in 40.1s").
  counts=$(for i in "${!pids[@]}"; do
             grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$STATE/test_$i.log" | tail -n 1
           done | grep -oE '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)' \
    | awk '{ sub(/errors/, "error", $2); n[$2] += $1 }
           END { split("passed failed error skipped xfailed xpassed", order, " ")
                 for (i = 1; i <= 6; i++)
                   if (order[i] in n) { printf "%s%d %s", sep, n[order[i]], order[i]; sep = ", " } }')
  local kept
  kept=$(grep -h -oE '[0-9]+ tests kept' "$STATE/test_0.log" | head -n 1)
  note "${counts:-no pytest summary} (${kept:-?}; $n processes; rc=$rc)"
  echo "total: ${counts:-?}"
  return $rc
}

step_sanitize() {
  local cs tool rc failed=0 results="" pids=() tools=(memcheck racecheck initcheck)
  cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  [ -x "$cs" ] || { note "compute-sanitizer not found"; return 1; }
  "$cs" --version | tail -n 1
  # The three tools at once: each is its own process and context; the probe is seconds of work, most
  # of the time is start-up under instrumentation.
  for tool in "${tools[@]}"; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 t 600 "$cs" --tool "$tool" --error-exitcode 9 --print-limit 20 \
      "$PY" benchmarks/gpu_checks.py sanitize-probe > "$STATE/sanitize_$tool.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!tools[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    tool=${tools[$i]}
    echo "--- compute-sanitizer --tool $tool (rc=$rc)"
    cat "$STATE/sanitize_$tool.log"
    local line
    line=$(grep -E '(ERROR|RACECHECK|INITCHECK|LEAK) SUMMARY' "$STATE/sanitize_$tool.log" | tail -n 1 \
      | sed -E 's/^=+ *//; s/ SUMMARY:/:/')
    if [ "$rc" -eq 0 ]; then results+="$tool ok (${line:-no summary}), "; else
      results+="$tool rc=$rc (${line:-no summary}), "; failed=$rc; fi
  done
  note "${results%, }; $(grep -h '^SUMMARY' "$STATE/sanitize_memcheck.log" | sed 's/^SUMMARY //')"
  return $failed
}

step_graph() {
  t 120 "$PY" benchmarks/gpu_checks.py graph
  local rc=$?
  note "$(grep '^SUMMARY' "$OUT/graph.log" | tail -n 1 | sed 's/^SUMMARY //')"
  return $rc
}

step_kernelbw() {
  t 300 "$PY" benchmarks/gpu_checks.py kernelbw "$OUT/kernelbw.csv"
  local rc=$?
  note "$(grep '^SUMMARY' "$OUT/kernelbw.log" | tail -n 1 | sed 's/^SUMMARY //')"
  return $rc
}

step_dropin() {
  if ! module_ok diffusers; then
    note "diffusers does not import ($WHEEL_NOTE)"
    return 77
  fi
  t 120 "$PY" benchmarks/gpu_checks.py dropin
  local rc=$?
  note "$(grep '^SUMMARY' "$OUT/kernelbw.log" | tail -n 1 | sed 's/^SUMMARY //')"
  return $rc
}

step_e2e() {
  if ! module_ok diffusers; then
    note "diffusers does not import ($WHEEL_NOTE)"
    return 77
  fi
  # The headline run keeps ~35 s for the phase check after it.
  local main_cap=$(($(step_time_left) - 35)) rc=0 phase_rc=0 runs=()
  if [ "$main_cap" -ge 90 ]; then
    echo "--- benchmarks/train.py --model sd15-random --epochs 3 --skip-trl (at most ${main_cap}s)"
    t "$main_cap" "$PY" benchmarks/train.py --model sd15-random --epochs 3 --skip-trl --csv "$STATE/train.csv"
    rc=$?
    if [ "$rc" -eq 0 ]; then
      note "sd15-random bf16: $("$PY" benchmarks/gpu_checks.py train-summary "$STATE/train.csv" \
        | sed -n 's/^SUMMARY //p')"
    else
      note "train.py sd15-random rc=$rc"
    fi
  else
    NO_TIME+=("e2e: sd15-random run"); note "sd15-random run skipped: ${main_cap}s left"
  fi
  # Phase consistency: weights frozen (learning rate 1e-30, no clipping), so approx_kl / clipfrac
  # measure how differently the sampling and training phases compute the same log-probs.
  local phase=(num_epochs=2 sample.num_steps=8 train.learning_rate=1e-30 train.max_grad_norm=0 mixed_precision=bf16
               reward_workers=1)
  if [ "$(step_time_left)" -ge 30 ]; then
    echo "--- phase consistency, tiny model, bf16: ${phase[*]}"
    t 120 "$PY" -m ddpo_fast.train --run-dir "$STATE/tiny-bf16" "${phase[@]}" || phase_rc=$?
    runs+=("$STATE/tiny-bf16")
  else
    NO_TIME+=("e2e: phase check"); add_note "phase check skipped: no time"
  fi
  if [ "$(step_time_left)" -ge 100 ]; then
    echo "--- phase consistency, tiny model, bf16, compile=true"
    t 200 "$PY" -m ddpo_fast.train --run-dir "$STATE/tiny-bf16-compile" "${phase[@]}" compile=true || phase_rc=$?
    runs+=("$STATE/tiny-bf16-compile")
  else
    NO_TIME+=("e2e: phase check with compile=true")
  fi
  if [ ${#runs[@]} -gt 0 ]; then
    add_note "phase $("$PY" benchmarks/gpu_checks.py phase "${runs[@]}" | sed -n 's/^SUMMARY //p')"
  fi
  [ "$rc" -ne 0 ] && return $rc
  return $phase_rc
}

step_bench() {
  t 600 "$PY" benchmarks/ops.py --device cuda --csv "$STATE/bench_ops.csv"
  local rc=$?
  note "benchmarks/ops.py --device cuda (rc=$rc): table in bench.log"
  return $rc
}

# The rewards at the paper's sizes (CLIP ViT-L/14 + LAION MLP, LLaVA-1.5-7B + RoBERTa-large, random
# weights built on the GPU, bf16): needs most of a 10-minute call alone.
step_rewards() {
  t 600 "$PY" benchmarks/rewards.py --full-size --device cuda:0 --size 512 --batch 8 \
    --rewards jpeg_compressibility,aesthetic,llava_bertscore --csv "$STATE/rewards_gpu.csv"
  local rc=$?
  note "benchmarks/rewards.py --full-size (rc=$rc): table in rewards.log"
  return $rc
}

# The human-preference rewards at their published sizes (PickScore and HPS v2: CLIP ViT-H/14 + the
# LAION tokenizer's vocabulary; clipscore: CLIP ViT-L/14; ImageReward: BLIP ViT-L/16 + BERT-base with
# cross-attention), random weights built on the GPU, bf16: a call of their own.
step_preference() {
  t 600 "$PY" benchmarks/rewards.py --full-size --device cuda:0 --size 512 --batch 8 \
    --rewards pickscore,clipscore,hpsv2,imagereward --csv "$STATE/rewards_preference_gpu.csv"
  local rc=$?
  note "benchmarks/rewards.py --full-size --rewards pickscore,clipscore,hpsv2,imagereward (rc=$rc): table in preference.log"
  return $rc
}

# The SD3 family end to end at SD3.5 medium's shapes (random weights, bf16, 512 px: Flow-GRPO's
# resolution), then the phase consistency of the other families' tiny models with frozen weights.
step_families() {
  if ! module_ok diffusers; then
    note "diffusers does not import ($WHEEL_NOTE)"
    return 77
  fi
  local rc=0 name
  t 420 "$PY" benchmarks/train.py --model sd35m-random --epochs 3 --skip-trl sample.resolution=512 \
    --csv "$STATE/train_sd3.csv" || rc=$?
  [ "$rc" -eq 0 ] && note "sd35m-random bf16 512px: $("$PY" benchmarks/gpu_checks.py train-summary \
    "$STATE/train_sd3.csv" | sed -n 's/^SUMMARY //p')"
  for name in tiny-sdxl tiny-sd3; do
    t 90 "$PY" -m ddpo_fast.train --run-dir "$STATE/$name-bf16" model=$name num_epochs=2 sample.num_steps=8 \
      train.learning_rate=1e-30 train.max_grad_norm=0 mixed_precision=bf16 reward_workers=1 || rc=$?
    note "$name: $("$PY" benchmarks/gpu_checks.py phase "$STATE/$name-bf16" 2>&1 | tail -n 1)"
  done
  return $rc
}

# ---- Dry run: what each step needs exists (no GPU; commands, scripts, imports, the test selection) --

DRY_FAILED=0
check() {  # check WHAT CMD...: runs CMD quietly; a failure is noted and fails the step
  local what=$1
  shift
  if "$@" > "$STATE/check.log" 2>&1; then echo "ok: $what"; else
    echo "FAILED: $what"; sed 's/^/    /' "$STATE/check.log" | tail -n 20; add_note "FAILED $what"; DRY_FAILED=1; fi
}
present() {  # present TOOL: reported, never required here
  if command -v "$1" > /dev/null; then printf '%s' "$1 found"; else printf '%s' "$1 absent (not required here)"; fi
}
has_help() {  # has_help "WORDS" CMD...: CMD --help works and mentions every word
  local words=$1 w out
  shift
  out=$("$@" --help 2>&1) || { echo "$out" | tail -n 5; return 1; }
  for w in $words; do grep -q -- "$w" <<< "$out" || { echo "--help lacks $w"; return 1; }; done
}
py_compiles() { "$PY" -m py_compile "$@"; }
dry_end() { local rc=$DRY_FAILED; DRY_FAILED=0; return $rc; }

dry_env() {
  check "gpu_checks.py env (imports here)" "$PY" benchmarks/gpu_checks.py env --no-gpu-ok --env-file "$ENV_FILE"
  cat "$ENV_FILE"
  local tools wheels
  tools="$(present nvidia-smi), $(present nvcc)"
  if [ "$N_WHEELS" -gt 0 ]; then
    # As the GPU machine will install them, for its Python 3.12 on x86-64 (--dry-run: nothing installed).
    check "the .whl wheels install for Python 3.12" "$PY" -m pip install --dry-run -q --no-index --no-deps \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target "$STATE/site" .whl/*.whl
    for w in diffusers deepspeed; do
      compgen -G ".whl/$w-*.whl" > /dev/null || { add_note "FAILED .whl has no $w wheel"; DRY_FAILED=1; }
    done
    wheels="$N_WHEELS wheels in .whl"
  else
    wheels="WARN $WHEEL_NOTE (e2e would SKIP)"
  fi
  add_note "$tools; $wheels"
  dry_end
}

dry_build() {
  check "setup.py, CMakeLists.txt" test -f setup.py -a -f CMakeLists.txt
  check "setup.py reads DDPO_FAST_CUDA, DDPO_FAST_CUDA_ARCHS, CMAKE_BUILD_PARALLEL_LEVEL" \
    grep -q 'CMAKE_BUILD_PARALLEL_LEVEL' setup.py
  check "build requirements import (pybind11)" "$PY" -c "import pybind11, setuptools"
  check "cmake" command -v cmake
  local built
  built=$("$PY" -c 'from ddpo_fast import _C; print("CUDA" if _C.built_with_cuda() else "CPU only")' 2>&1 | tail -n 1)
  add_note "$(present nvcc); _C here: $built"
  dry_end
}

dry_test() {
  check "test files compile" py_compiles tests/conftest.py "${TEST_PATHS[@]}"
  local out line kept total deselected
  out=$(DDPO_FAST_GPU_FOCUS=1 "$PY" -m pytest --collect-only -q -p no:cacheprovider "${TEST_PATHS[@]}" 2>&1)
  echo "$out" | grep -E 'DDPO_FAST_GPU_FOCUS|collected'
  line=$(grep -E '^[0-9]+/[0-9]+ tests collected \([0-9]+ deselected\)' <<< "$out" | tail -n 1)
  kept=$(sed -E 's#^([0-9]+)/.*#\1#' <<< "$line")
  total=$(sed -E 's#^[0-9]+/([0-9]+) .*#\1#' <<< "$line")
  deselected=$(sed -E 's#.*\(([0-9]+) deselected\).*#\1#' <<< "$line")
  # Plausible: a few hundred tests kept, most of test_cuda.py's ~1,700 parametrizations left out.
  if [ -n "$line" ] && [ "$kept" -ge 200 ] && [ "$kept" -le 800 ] && [ "$deselected" -gt "$kept" ]; then
    echo "ok: DDPO_FAST_GPU_FOCUS=1 collects $kept of $total"
  else
    echo "FAILED: focus selection: '${line:-no collection line}'"
    echo "$out" | tail -n 20
    DRY_FAILED=1
  fi
  add_note "DDPO_FAST_GPU_FOCUS=1 selects ${kept:-?} of ${total:-?} (${deselected:-?} deselected)"
  # One shard of the test step's processes: a share of the selection, no more.
  local n=12 shard
  shard=$(DDPO_FAST_GPU_FOCUS=1 DDPO_FAST_GPU_SHARD=0/$n "$PY" -m pytest --collect-only -q -p no:cacheprovider \
    "${TEST_PATHS[@]}" 2>&1 | sed -nE 's#^([0-9]+)/[0-9]+ tests collected.*#\1#p' | tail -n 1)
  if [ -n "$shard" ] && [ -n "$kept" ] && [ "$shard" -ge $((kept / n - 10)) ] \
    && [ "$shard" -le $((kept / n + 10)) ]; then
    echo "ok: DDPO_FAST_GPU_SHARD=0/$n collects $shard"
    add_note "shard 0/$n: $shard"
  else
    echo "FAILED: DDPO_FAST_GPU_SHARD=0/$n collects '${shard:-nothing}' of ${kept:-?}"
    add_note "FAILED shard 0/$n: ${shard:-nothing}"
    DRY_FAILED=1
  fi
  dry_end
}

# The GPU subcommands' calls run on the CPU (C++ CPU backend, Triton's interpreter): their use of
# the ops is checked here, only the GPU parts (capture, timing, the sanitizer) are not.
smoke() { TRITON_INTERPRET=1 "$PY" benchmarks/gpu_checks.py "$@" --cpu-smoke; }

dry_sanitize() {
  check "gpu_checks.py sanitize-probe --cpu-smoke" smoke sanitize-probe
  add_note "probe calls ran on the CPU; $(present compute-sanitizer)"
  dry_end
}

dry_graph() {
  check "gpu_checks.py graph --cpu-smoke (eager steps, no capture)" smoke graph
  add_note "eager steps ran on the CPU; capture needs a GPU"
  dry_end
}

dry_kernelbw() {
  check "gpu_checks.py kernelbw --cpu-smoke" smoke kernelbw "$STATE/kernelbw_smoke.csv"
  add_note "each case's calls ran on the CPU; timing needs a GPU"
  dry_end
}

dry_dropin() {
  check "gpu_checks.py dropin --cpu-smoke" smoke dropin
  add_note "each candidate's calls ran on the CPU; timing needs a GPU"
  dry_end
}

dry_e2e() {
  check "benchmarks/train.py compiles" py_compiles benchmarks/train.py benchmarks/gpu_checks.py
  check "benchmarks/train.py --help (--model sd15-random --skip-trl --epochs --csv)" \
    has_help "--model sd15-random --skip-trl --epochs --csv" "$PY" benchmarks/train.py
  check "benchmarks/train.py's CSV has the columns train-summary reads" \
    grep -q '"trainer", "samples_per_s", "peak_memory_mb", "mfu"' benchmarks/train.py
  check "python -m ddpo_fast.train --help" has_help "--run-dir" "$PY" -m ddpo_fast.train
  # The phase runs' keys are the trainer's (validated as the trainer validates them).
  check "phase-check overrides validate" "$PY" -c "from ddpo_fast import config as cfg
c = cfg.from_preset(cfg.DEFAULT_PRESET, ['num_epochs=2', 'sample.num_steps=8', 'train.learning_rate=1e-30',
    'train.max_grad_norm=0', 'mixed_precision=bf16', 'reward_workers=1', 'compile=true'])
cfg.validate(c)"
  mkdir -p "$STATE/run"
  echo '{"epoch": 0, "approx_kl": 0.0, "clipfrac": 0.0, "loss": 0.1, "samples_per_s": 1.0}' > "$STATE/run/metrics.jsonl"
  check "gpu_checks.py phase" "$PY" benchmarks/gpu_checks.py phase "$STATE/run"
  printf 'trainer,samples_per_s,peak_memory_mb,mfu,model,epochs\nddpo_fast,1.0,1024,0.3,sd15-random,3\n' \
    > "$STATE/train.csv"
  check "gpu_checks.py train-summary" "$PY" benchmarks/gpu_checks.py train-summary "$STATE/train.csv"
  add_note "train.py, ddpo_fast.train, phase keys and parsers checked"
  dry_end
}

dry_bench() {
  check "benchmarks/ops.py --help" has_help "--device --csv" "$PY" benchmarks/ops.py
  dry_end
}

dry_rewards() {
  check "benchmarks/rewards.py --help" has_help "--full-size" "$PY" benchmarks/rewards.py
  dry_end
}

dry_families() {
  check "benchmarks/train.py --help (--model sd35m-random)" has_help "sd35m-random" "$PY" benchmarks/train.py
  check "the families step's keys validate" "$PY" -c "from ddpo_fast import config as cfg
for model in ('sd35m-random', 'tiny-sdxl', 'tiny-sd3'):
    cfg.validate(cfg.from_preset(cfg.DEFAULT_PRESET, ['model=' + model, 'sample.resolution=512', 'mixed_precision=bf16']))"
  dry_end
}

dry_preference() {
  check "benchmarks/rewards.py --help" has_help "--full-size --rewards" "$PY" benchmarks/rewards.py
  dry_end
}

# ---- Run -------------------------------------------------------------------------------------------

[ "$DRY_RUN" = 1 ] && echo "=== dry run (no GPU needed): checks what each step needs; logs in $OUT"
for step in "${STEPS[@]}"; do
  if [ -n "${CAP[$step]:-}" ]; then
    run_step "$step"
  else
    echo "unknown step '$step' (steps: ${ALL_STEPS[*]} bench rewards preference families)"
    R_NAME+=("$step"); R_STATUS+=("FAIL"); R_SECS+=(0); R_NOTE+=("unknown step")
  fi
done

failed=()
for i in "${!R_NAME[@]}"; do
  case ${R_STATUS[$i]} in
    ok) ;;
    SKIP) [ "$DRY_RUN" = 1 ] && failed+=("${R_NAME[$i]}") ;;  # a dry run checks every step
    *) failed+=("${R_NAME[$i]}") ;;
  esac
done
{
  echo
  if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_suite DRY RUN $(date -u +%Y-%m-%dT%H:%MZ): $(($(date +%s) - SUITE_START)) s, python $PY"
  else
    echo "gpu_suite $(date -u +%Y-%m-%dT%H:%MZ): $(fact gpu); torch $(fact torch); triton $(fact triton);" \
      "$(($(date +%s) - SUITE_START)) s of a ${BUDGET} s budget; \`bash benchmarks/gpu_suite.sh $*\`"
  fi
  echo
  echo "| step | status | seconds | key figure |"
  echo "| --- | --- | --- | --- |"
  for i in "${!R_NAME[@]}"; do
    echo "| ${R_NAME[$i]} | ${R_STATUS[$i]} | ${R_SECS[$i]} | ${R_NOTE[$i]} |"
  done
  echo
  if [ ${#NO_TIME[@]} -gt 0 ]; then echo "skipped for lack of time: ${NO_TIME[*]}"; fi
  if [ ${#failed[@]} -eq 0 ]; then echo "all steps ok"; else echo "steps not ok: ${failed[*]}"; fi
  echo "logs: $OUT"
} | tee "$OUT/summary.txt"
rm -rf "$STATE"
[ ${#failed[@]} -eq 0 ]

#!/usr/bin/env bash
# One-shot GPU speed check (the "scale" issue's must-show figures), sized for ~8 minutes of wall time on one GPU.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh          # on the GPU machine (writes everything under $OUT)
#   GPU_CHECK_DRY=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh   # CPU dry run: random:tiny, tiny batches, 1 step
#
# Jobs, most important first (each a benchmarks/step_time.py run on random:vit-b-16, methods coop, vpt_deep and
# maple plus U, with its own timeout; a job that no longer fits the budget is skipped and says so):
#   1. b256_bf16_none      batch 256, bf16, eager                  (before; fraction of bf16 peak)
#   2. b256_bf16_default   batch 256, bf16, --compile default      (after: regional torch.compile)
#   3. b8_bf16_none        batch 8, bf16, eager                    (before; launch-bound)
#   4. b8_bf16_ro          batch 8, bf16, --compile reduce-overhead (after: CUDA graphs)
#   5. b8_fp32_none        batch 8, fp32, eager
#   6. b8_fp32_ro          batch 8, fp32, --compile reduce-overhead
#   7. b256_bf16_autotune  batch 256, bf16, --compile max-autotune  (only if time is left: autotuning is slow)
# Raw output of every job is tee'd to $OUT/<job>.log; each finished job writes $OUT/<job>.md and .json;
# $OUT/summary.md and summary.json compare them (35% of bf16 peak at batch 256; batch-8 steps against the
# launch-bound H100 figures of docs/benchmarks/step_time_gpu.md).
#
# Environment: OUT (default: a new temporary folder), PYTHON (default: .venv/bin/python if it exists, else python3),
# GPU_CHECK_BUDGET_S (default 450: seconds for all jobs; the summary takes a few more), GPU_CHECK_DRY=1.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

say "repo $REPO, python $PY, OUT $OUT, dry=$DRY, budget ${BUDGET}s"
{
  echo "== nvidia-smi"; (nvidia-smi 2>&1 || echo "nvidia-smi: not available")
  echo "== versions"
  git -C "$REPO" log -1 --format='commit %H %cd' 2>/dev/null || true
  "$PY" - <<'EOF' 2>&1
import platform, os
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cpus", os.cpu_count())
for name in ("transformers", "accelerate", "triton"):
    try:
        mod = __import__(name); print(name, mod.__version__)
    except Exception as err:
        print(name, "not importable:", err)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "| capability", f"{p.major}.{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1))
    from vlprompt.engine import speed
    for prec in ("bf16", "fp32"):
        peak = speed.device_peak("cuda", prec)
        print("peak", prec, peak.flops_per_s, "|", peak.source)
else:
    print("CUDA not available")
from vlprompt.backbones.presets import find_clip_bpe
print("CLIP BPE vocabulary:", find_clip_bpe())
EOF
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"

if [[ "$DRY" == "1" ]]; then
  MODEL=random:tiny; BIG=4; SMALL=2; BIG_STEPS="--steps 1 --warmup 0"; SMALL_STEPS="--steps 1 --warmup 0"
  RO=default  # CUDA graphs need a GPU: the dry run checks the same jobs with --compile default
  THREADS=2
  say "DRY RUN on $(uname -n): random:tiny, batches $BIG/$SMALL, 1 step; reduce-overhead replaced by default"
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "no CUDA device visible to $PY: stopping (GPU_CHECK_DRY=1 runs the CPU dry run)"; exit 2
  fi
  MODEL=random:vit-b-16; BIG=256; SMALL=8; BIG_STEPS="--steps 10 --warmup 3"; SMALL_STEPS="--steps 20 --warmup 5"
  RO=reduce-overhead
  THREADS=8
fi
METHODS="--method coop --method vpt_deep --method maple"

# job NAME CAP_S PER_PROCESS_TIMEOUT_S MIN_S ARGS...: run step_time.py within min(CAP, budget left - 10 s)
job() {
  local name="$1" cap="$2" per="$3" min="$4"; shift 4
  local t; t=$(left); t=$(( t - 10 )); (( t > cap )) && t=$cap
  if (( t < min )); then say "SKIP $name: ${t}s left for it, needs ${min}s"; echo "$name skipped (${t}s left)" >> "$OUT/skipped.txt"; return; fi
  say "START $name (timeout ${t}s): step_time.py $*"
  timeout -k 5 "$t" "$PY" benchmarks/step_time.py --model "$MODEL" $METHODS --coop-classes 0 --threads "$THREADS" \
      --timeout "$per" --out "$OUT/$name.md" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  say "END $name rc=$rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out: per-record figures are in its log)')"
}

# Caps per job (seconds; a job gets at most what the budget has left): eager jobs start 4 processes, compiled ones
# also compile each layer graph in each.
if [[ "$DRY" == "1" ]]; then CAP1=120; CAP2=240; CAP3=120; CAP4=240; PER=120; MIN=20
else CAP1=100; CAP2=150; CAP3=70; CAP4=140; PER=150; MIN=45; fi
job b256_bf16_none    "$CAP1" "$PER" "$MIN" --batch-size $BIG --precisions bf16 $BIG_STEPS --compile none
job b256_bf16_default "$CAP2" "$PER" "$MIN" --batch-size $BIG --precisions bf16 $BIG_STEPS --compile default
job b8_bf16_none      "$CAP3" "$PER" "$MIN" --batch-size $SMALL --precisions bf16 $SMALL_STEPS --compile none
job b8_bf16_ro        "$CAP4" "$PER" "$MIN" --batch-size $SMALL --precisions bf16 $SMALL_STEPS --compile $RO
job b8_fp32_none      "$CAP3" "$PER" "$MIN" --batch-size $SMALL --precisions fp32 $SMALL_STEPS --compile none
job b8_fp32_ro        "$CAP4" "$PER" "$MIN" --batch-size $SMALL --precisions fp32 $SMALL_STEPS --compile $RO
if [[ "$DRY" == "1" ]]; then AUTOMIN=20; else AUTOMIN=150; fi
job b256_bf16_autotune 240 "$PER" "$AUTOMIN" --batch-size $BIG --precisions bf16 $BIG_STEPS --compile max-autotune

say "summary"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
# docs/benchmarks/step_time_gpu.md, batch 8 on an H100 (eager, launch-bound): ms per step
LAUNCH_BOUND_MS = {"fp32": {"coop": 29.6, "vpt_deep": 26.3, "maple": 42.7, "U": 22.9},
                   "bf16": {"coop": 34.1, "vpt_deep": 26.7, "maple": 42.7, "U": 30.4}}
JOBS = ["b256_bf16_none", "b256_bf16_default", "b256_bf16_autotune", "b8_bf16_none", "b8_bf16_ro", "b8_fp32_none",
        "b8_fp32_ro"]
rows, summary = [], {"jobs": {}, "checks": []}
for job in JOBS:
    path = out / f"{job}.json"
    if not path.exists():
        summary["jobs"][job] = None
        rows.append(f"| {job} | (no result: skipped or timed out, see {job}.log) | | | | | |")
        continue
    result = json.loads(path.read_text())
    meta = result["_meta"]
    recs = {"U": result["_U"]}
    for m in ("coop", "vpt_deep", "maple"):
        if m in result:
            recs[m] = result[m]["records"]
    job_sum = {}
    for what, by_p in recs.items():
        for p, r in by_p.items():
            if "error" in r:
                rows.append(f"| {job} | {what} | {p} | error: {r['error'][:80]} | | | |")
                continue
            frac = r.get("peak_fraction")
            job_sum[f"{what}/{p}"] = {k: r.get(k) for k in ("step_s", "images_per_s", "flops_per_image",
                                                           "achieved_flops_per_s", "peak_fraction", "warmup_s",
                                                           "compile", "batch_size", "peak_mb")}
            rows.append(f"| {job} | {what} | {p} | {r['step_s'] * 1000:.1f} ms | {r.get('images_per_s') or 0:,.0f} | "
                        + ("—" if frac is None else f"{100 * frac:.1f}%") + f" | {r.get('warmup_s') or 0:.1f} s |")
    summary["jobs"][job] = {"meta": {k: meta.get(k) for k in ("gpu", "compile", "batch_size", "precisions", "peaks",
                                                              "torch", "date", "command")}, "records": job_sum}
# checks
def rec(job, key):
    j = summary["jobs"].get(job)
    return None if not j else j["records"].get(key)
for job in ("b256_bf16_none", "b256_bf16_default", "b256_bf16_autotune"):
    for what in ("U", "coop", "vpt_deep", "maple"):
        r = rec(job, f"{what}/bf16")
        if r and r.get("peak_fraction") is not None:
            summary["checks"].append({"check": f"{job} {what}: >= 35% of bf16 peak", "value": r["peak_fraction"],
                                      "pass": r["peak_fraction"] >= 0.35})
for p in ("bf16", "fp32"):
    for job in (f"b8_{p}_none", f"b8_{p}_ro"):
        for what in ("U", "coop", "vpt_deep", "maple"):
            r = rec(job, f"{what}/{p}")
            if r and r.get("step_s"):
                speedup = LAUNCH_BOUND_MS[p][what] / (1000 * r["step_s"])
                summary["checks"].append({"check": f"{job} {what}: step >= 2x faster than the H100 launch-bound "
                                                   f"{LAUNCH_BOUND_MS[p][what]} ms", "value": speedup,
                                          "pass": speedup >= 2})
    for what in ("U", "coop", "vpt_deep", "maple"):
        before, after = rec(f"b8_{p}_none", f"{what}/{p}"), rec(f"b8_{p}_ro", f"{what}/{p}")
        if before and after and before.get("step_s") and after.get("step_s"):
            speedup = before["step_s"] / after["step_s"]
            summary["checks"].append({"check": f"b8 {p} {what}: eager / CUDA-graph step on this GPU",
                                      "value": speedup, "pass": speedup >= 2})
for what in ("U", "coop", "vpt_deep", "maple"):
    before, after = rec("b256_bf16_none", f"{what}/bf16"), rec("b256_bf16_default", f"{what}/bf16")
    if before and after and before.get("step_s") and after.get("step_s"):
        summary["checks"].append({"check": f"b256 bf16 {what}: eager / compiled (default) step (informational)",
                                  "value": before["step_s"] / after["step_s"], "pass": after["step_s"] <= before["step_s"]})
lines = ["# GPU check summary", "", "| job | what | precision | step (median) | images/s | of peak | warm-up |",
         "|---|---|---|---:|---:|---:|---:|", *rows, "", "## Checks", "", "| check | value | pass |", "|---|---:|---|"]
for c in summary["checks"]:
    v = c["value"]
    lines.append(f"| {c['check']} | {100 * v:.1f}% |" if "peak" in c["check"] else f"| {c['check']} | {v:.2f}x |")
    lines[-1] += f" {'yes' if c['pass'] else 'NO'} |"
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n".join(lines))
EOF
say "done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"

#!/usr/bin/env bash
# GPU checks (issue 16 part A): the ONE script a GPU session runs, from the repo root, after
# `bash scripts/fetch_gpu_wheels.sh` here (wheels -> .whl/, TinyStories + GPT-2 BPE -> .gpu_data/):
#
#   run(carry=[".whl", ".gpu_data"], command="bash scripts/gpu_check.sh", timeout_s=600)
#
# Output under $OUT (default ./gpu_out), at most 8 files because that is what a device call brings back:
#   gpu_check.log            everything printed (versions, test results, bench tables, training log, verdicts)
#   pytest_gpu.xml           results of tests/test_gpu.py
#   bench.json               every benchmark record + the targets with PASS/FAIL (written after the benches,
#                            rewritten at the end with the training run's throughput)
#   run124m_summary.json, run124m_metrics.jsonl, run124m_run_info.json   the ~2-minute dense_124m training run
# Scratch (bench JSONs before merging, the run dir with its 1.5 GB checkpoint, token cache) goes to $WORK.
#
# Time budget on an H100 (expected / the step's own timeout). A step never starts with under 20 s of the
# script's budget (BUDGET_S, 540 s) left, and its timeout is cut to what is left, so one hang cannot eat
# the device call (timeout_s 600; the machine's start-up, ~1-2 min, comes on top of the script).
#   a   install wheels, versions, import check          10 s /  60 s
#   b   pytest -m gpu tests/test_gpu.py                  60 s / 150 s  (one torch.compile of the tiny model)
#   c1  bench dense_124m bf16, train.compile=true        75 s / 150 s  (compiling 124M: ~40 s)
#   c2  bench dense_124m bf16, train.compile=false       25 s /  75 s
#   c3  bench baseline_10m bs 128 bf16 (+ naive)         20 s /  60 s
#   c4  bench baseline_10m | moe_8x | d_ff 4096          30 s /  90 s
#   c5  bench dense_124m adamw | muon, compile           50 s / 120 s  (compile mostly cached from c1)
#   c6  MoE layer grouped vs loop, bf16                  15 s /  45 s
#   d   dense_124m training, 3800 steps                 200 s / 240 s  (start 20 + compile 40 + steps 120
#                                                                       + evals/samples/final checkpoint 20)
#   expected total ~485 s (~8 min)
#
# Targets (checked at the end, PASS/FAIL in the log and in bench.json): dense_124m bf16 + compile >= 45% MFU
# (datasheet peak); grouped MoE layer >= 3x the loop; moe_8x >= 0.8x the tokens/s of the equal-active dense
# model; Muon's step overhead <= 5% of an AdamW step at 124M.
#
# DRY_RUN=1 prints the steps without running them (for checking the script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-./gpu_out}
WORK=${WORK:-/tmp/gpu_check}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-540}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export OUT WORK PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
START=$(date +%s)
RESULTS=()

# dense_124m: 124.16M matmul weights (W_e + 12 blocks + tied W_ue, nn.Linear) -> 6 * 124.16M = 745.0M FLOPs per
# token, plus attention 12 * L * T * D = 12 * 12 * 1024 * 768 = 113.2M: 858.2M FLOPs/token
# (Transformer.flops_per_token). At 45% MFU of the H100's 989e12 dense bf16 peak: 0.45 * 989e12 / 858.2e6
# = 518.6k tokens/s = 31.65 steps/s of 16 x 1024 tokens, so 2 minutes = 3798 steps -> 3800.
TRAIN_STEPS=${TRAIN_STEPS:-3800}
TOKENS_PER_STEP=$((16 * 1024))
EXPECTED_TOKENS_PER_S=518600
TRAIN_TIMEOUT_S=240

step() {  # step NAME TIMEOUT_S CMD...: CMD under its own timeout, cut to what is left of the budget
  local name=$1 limit=$2 left t0 rc dt verdict
  shift 2
  left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 20)); then
    echo "=== [$name] SKIPPED: ${left}s of the ${BUDGET_S}s budget left"
    RESULTS+=("$(printf '%-20s %-16s' "$name" skipped)")
    return 1
  fi
  ((limit > left)) && limit=$left
  echo
  echo "=== [$name] $(date +%T), timeout ${limit}s: $*"
  if [[ $DRY_RUN == 1 ]]; then
    RESULTS+=("$(printf '%-20s %-16s' "$name" dry-run)")
    return 0
  fi
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@"
  rc=$?
  dt=$(($(date +%s) - t0))
  verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMEOUT"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED (rc $rc)"
  echo "=== [$name] $verdict after ${dt}s"
  RESULTS+=("$(printf '%-20s %-16s %4ds' "$name" "$verdict" "$dt")")
  return "$rc"
}

setup() {  # (a) the carried wheels, then what this machine is
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
      return 1
  else
    echo "no .whl/ here: using the packages already installed"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: SM {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("no CUDA device: the gpu tests skip and the CUDA benchmarks fail")
for pkg in ["triton", "numpy", "hydra-core", "omegaconf", "datasets", "pyarrow", "fsspec", "huggingface-hub",
            "dill", "multiprocess", "pandas", "tokenizers", "submitit", "pytest", "wandb"]:
    try:
        print(f"  {pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"  {pkg} not installed")
# datasets 5.2 asks for pyarrow >= 24 (not carried: its wheel is 55 MB); a failure of step d points here
import scaletrain.bench, scaletrain.bench_moe, scaletrain.run, scaletrain.trainer  # noqa: E401,F401
from scaletrain.hardware import gpu_peak_flops
if torch.cuda.is_available():
    print(f"datasheet dense bf16 peak: {(gpu_peak_flops(torch.device('cuda')) or 0) / 1e12:.0f} TFLOP/s")
print("imports: ok")
EOF
}

moe_layer_cuda() {  # (c6) when bench_moe has no --device: the same layer timing, on CUDA with syncs
  "$PY" - <<'EOF'
import json, os, statistics, time
import torch
from scaletrain.config import ModelConfig, MoEConfig
from scaletrain.moe import MoE

D, FF, E, K = 512, 2048, 8, 2  # bench_moe's defaults = moe_8x's layer (baseline_10m width, d_ff experts)
mc = ModelConfig(name="bench", d_model=D, d_ff=FF, n_layers=1)
record = {"config": dict(d_model=D, d_expert=FF, experts=E, top_k=K, dtype="bf16"), "rows": []}
print(f"MoE fwd+bwd on {torch.cuda.get_device_name()}, bf16 autocast, E={E} top-{K} D={D} F={FF}")
for tokens in (4096, 32768):  # bench_moe's default; moe_8x's bench micro-batch (128 x 256)
    torch.manual_seed(0)
    x = torch.randn(1, tokens, D, device="cuda", requires_grad=True)
    ms = {}
    for impl in ("loop", "grouped"):
        layer = MoE(mc, MoEConfig(name="bench", n_experts=E, top_k=K, impl=impl)).cuda()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            (y.float().pow(2).mean() + layer.aux_loss).backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None

        times = []
        for i in range(13):  # 3 warm-up calls
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ms[impl] = 1e3 * statistics.median(times[3:])
        tflops = 6 * tokens * K * 2 * D * FF / (ms[impl] / 1e3) / 1e12
        row = dict(tokens=tokens, impl=impl, ms=ms[impl], tokens_per_s=tokens / (ms[impl] / 1e3), tflops=tflops,
                   dispatch=layer.dispatch)
        record["rows"].append(row)
        print(f"  tokens {tokens:6d} {impl:8s} {ms[impl]:8.2f} ms {row['tokens_per_s']:12.0f} tok/s "
              f"{tflops:7.1f} TFLOP/s  {layer.dispatch}")
    record[f"grouped_over_loop_{tokens}"] = ms["loop"] / ms["grouped"]
    print(f"  tokens {tokens}: grouped is {ms['loop'] / ms['grouped']:.2f}x the loop")
with open(os.path.join(os.environ["WORK"], "bench_moe_layer.json"), "w") as f:
    json.dump(record, f, indent=2)
EOF
}

moe_layer() {  # (c6) python -m scaletrain.bench_moe where it can time CUDA, else the inline version
  set -o pipefail
  if "$PY" -m scaletrain.bench_moe --help 2>/dev/null | grep -- "--device" > /dev/null; then  # not -q: it would exit early (SIGPIPE under pipefail)
    for tokens in 4096 32768; do
      "$PY" -m scaletrain.bench_moe --device cuda --dtypes bf16 --impls loop,grouped --tokens "$tokens" --repeats 10 |
        tee "$WORK/bench_moe_$tokens.txt" || return 1
    done
  else
    echo "scaletrain.bench_moe has no --device flag (it times the CPU): timing the same layer on CUDA inline"
    moe_layer_cuda
  fi
}

summarize() {  # bench.json in $OUT: every bench record, the MoE layer timings, the run's throughput, the targets
  "$PY" - <<'EOF'
import glob, json, os, re, statistics
work, out = os.environ["WORK"], os.environ["OUT"]
bench = {}
for f in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
    with open(f) as fh:
        bench[os.path.basename(f)[: -len(".json")]] = json.load(fh)
for f in sorted(glob.glob(os.path.join(work, "bench_moe_*.txt"))):  # bench_moe's own table, if it ran on CUDA
    text = open(f).read()
    m = re.search(r"^bf16\s+grouped\s+False\s.*?([\d.]+)x", text, re.M)
    bench.setdefault("bench_moe_layer", {})[f"grouped_over_loop_{f.split('_')[-1][:-4]}"] = float(m[1]) if m else None
    bench["bench_moe_layer"][os.path.basename(f)] = text


def rows(name):
    return bench.get(name, {}).get("rows", [])


def pick(name, config=None, impl="scaletrain"):
    found = [r for r in rows(name) if r.get("impl") == impl and (config is None or r.get("config") == config)]
    return found[0] if found else None


targets = []


def target(what, value, op, goal, fmt):
    ok = None if value is None else (value >= goal if op == ">=" else value <= goal)
    verdict = "MISSING" if ok is None else ("PASS" if ok else "FAIL")
    shown = "n/a" if value is None else format(value, fmt)
    targets.append(dict(target=f"{what} {op} {format(goal, fmt)}", value=value, verdict=verdict))
    print(f"  {verdict:8s} {what}: {shown} (target {op} {format(goal, fmt)})")


print("targets:")
r = pick("bench_124m_compile")
target("dense_124m bf16+compile MFU (datasheet peak)", r and r.get("mfu_datasheet"), ">=", 0.45, ".1%")
ratio = bench.get("bench_moe_layer", {}).get("grouped_over_loop_4096")
target("MoE layer grouped / loop speed (4096 tokens, bf16)", ratio, ">=", 3.0, ".2f")
moe, dense = pick("bench_moe_vs_dense", "model=moe_8x"), pick("bench_moe_vs_dense", "model.d_ff=4096")
target("moe_8x / equal-active dense tokens/s", moe and dense and moe["tokens_per_s"] / dense["tokens_per_s"],
       ">=", 0.8, ".2f")
adamw, muon = pick("bench_124m_muon", "model=dense_124m"), pick("bench_124m_muon", "optim=muon")
target("Muon step overhead over AdamW at 124M", adamw and muon and muon["step_ms"] / adamw["step_ms"] - 1,
       "<=", 0.05, ".1%")

run = {}
summary, metrics = os.path.join(out, "run124m_summary.json"), os.path.join(out, "run124m_metrics.jsonl")
if os.path.exists(metrics):
    recs = [json.loads(line) for line in open(metrics)]
    perf = [x for x in recs if "perf/tokens_per_s" in x][1:]  # the first window holds the compile
    if perf:
        run["median_tokens_per_s"] = statistics.median(x["perf/tokens_per_s"] for x in perf)
        mfu = [x["perf/mfu"] for x in perf if "perf/mfu" in x]
        run["median_mfu"] = statistics.median(mfu) if mfu else None
        run["last_train_loss"] = perf[-1].get("train/loss")
    if os.path.exists(summary):
        run["summary"] = json.load(open(summary))
    print(f"training run: {json.dumps({k: v for k, v in run.items() if k != 'summary'})}")

print("tokens/s and MFU of every bench row:")
for name in sorted(bench):
    for r in rows(name) if name != "bench_moe_layer" else []:
        mfu = r.get("mfu_datasheet")
        print(f"  {name:20s} {r['config']:28s} {r['impl']:10s} {r['tokens_per_s']:10.0f} tok/s "
              f"step {r['step_ms']:7.1f} ms (fwd+bwd {r['fwd_bwd_ms']:6.1f}, optim {r['optim_ms']:5.1f})"
              + (f"  MFU {mfu:.1%}" if mfu is not None else ""))
with open(os.path.join(out, "bench.json"), "w") as fh:
    json.dump({"benchmarks": bench, "training_run": run, "targets": targets}, fh, indent=2)
print(f"wrote {os.path.join(out, 'bench.json')}")
EOF
}

train_steps() {  # TRAIN_STEPS, cut so that its steps fit the step's time (at the measured bench speed if known)
  local left=$((BUDGET_S - ($(date +%s) - START))) tok_s
  ((left > TRAIN_TIMEOUT_S)) && left=$TRAIN_TIMEOUT_S
  left=$((left - 90))  # start-up, compile, evals + samples, final checkpoint
  tok_s=$("$PY" -c 'import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    print(int(min(r["tokens_per_s"] for r in rows if r["impl"] == "scaletrain")))
except Exception:
    print(sys.argv[2])' "$WORK/bench_124m_compile.json" "$EXPECTED_TOKENS_PER_S" 2>/dev/null)
  local fit=$((left * ${tok_s:-$EXPECTED_TOKENS_PER_S} / TOKENS_PER_STEP))
  if ((fit < TRAIN_STEPS)); then
    echo "${left}s for training steps at ${tok_s} tokens/s: $fit steps instead of $TRAIN_STEPS" >&2
    echo $((fit > 100 ? fit : 100))
  else
    echo "$TRAIN_STEPS"
  fi
}

main() {
  local sha
  sha=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || sha+=-dirty; }
  echo "gpu_check: $(date -u +%FT%TZ), git ${sha:-unknown}, OUT=$OUT, WORK=$WORK, budget ${BUDGET_S}s"
  if compgen -G ".whl/*.whl" >/dev/null; then
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  [[ -f .gpu_data/tinystories/train.txt && -f .gpu_data/gpt2_tokenizer/vocab.json ]] ||
    echo "warning: no .gpu_data/ (bash scripts/fetch_gpu_wheels.sh here, then carry it): step d will fail"
  export -f setup moe_layer moe_layer_cuda
  export PY
  if ! step a_setup 60 bash -c setup && [[ $DRY_RUN != 1 ]]; then
    echo "setup failed: nothing else can run (see above)"
    return 1
  fi

  step b_pytest_gpu 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
    --junitxml "$OUT/pytest_gpu.xml"

  local common=(--precisions bf16 --steps 10 --warmup 3)
  local g124=(model=dense_124m data.seq_len=1024 train.batch_size=16 train.device=cuda)
  step c1_bench_124m_compile 150 "$PY" -m scaletrain.bench "${g124[@]}" train.compile=true "${common[@]}" \
    --out "$WORK/bench_124m_compile.json"
  step c2_bench_124m_eager 75 "$PY" -m scaletrain.bench "${g124[@]}" train.compile=false "${common[@]}" \
    --out "$WORK/bench_124m_eager.json"
  step c3_bench_10m 60 "$PY" -m scaletrain.bench model=baseline_10m train.batch_size=128 train.device=cuda \
    "${common[@]}" --naive --out "$WORK/bench_10m.json"
  # MoE at equal active parameters: moe_8x = baseline_10m (d 512, 3 layers) with top-2 of 8 experts of d_ff
  # 2048 in every layer, so a token passes 2 x (512x2048 + 2048x512) = 4.19M expert weights per layer; the dense
  # model with d_ff 4096 has the same 2 x 512x4096 = 4.19M (active 20.20M vs 20.19M params: the router's
  # 512x8 per layer is the difference). "" is baseline_10m itself (d_ff 2048: half the active MLP).
  step c4_bench_moe_vs_dense 90 "$PY" -m scaletrain.bench train.batch_size=128 train.device=cuda "${common[@]}" \
    --variants "" "model=moe_8x" "model.d_ff=4096" --out "$WORK/bench_moe_vs_dense.json"
  # Muon's share of the step at 124M, against AdamW in the same process, both compiled as in training
  step c5_bench_124m_muon 120 "$PY" -m scaletrain.bench "${g124[@]}" train.compile=true "${common[@]}" \
    --variants "" "optim=muon" --out "$WORK/bench_124m_muon.json"
  step c6_moe_layer 45 bash -c moe_layer
  [[ $DRY_RUN == 1 ]] || summarize  # bench.json now, in case the training run is cut off

  local n run_dir=$WORK/run124m
  n=$(train_steps)
  rm -rf "$run_dir"
  step d_train_124m "$TRAIN_TIMEOUT_S" "$PY" -m scaletrain.run model=dense_124m \
    data.path=.gpu_data/tinystories data.tokenizer.kind=gpt2 data.tokenizer.gpt2_dir=.gpu_data/gpt2_tokenizer \
    data.cache_dir="$WORK/cache" data.seq_len=1024 train.batch_size=16 train.max_steps="$n" train.device=cuda \
    train.compile=true train.precision=bf16 train.eval_every=1000 train.eval_batches=8 train.ckpt_every=0 \
    train.log_every=50 train.progress_bar=false logging.wandb.mode=disabled hydra.run.dir="$run_dir"
  for f in summary.json metrics.jsonl run_info.json; do
    [[ -f $run_dir/$f ]] && cp "$run_dir/$f" "$OUT/run124m_$f"
  done
  [[ $DRY_RUN == 1 ]] || summarize

  echo
  echo "steps (budget ${BUDGET_S}s, used $(($(date +%s) - START))s):"
  printf '  %s\n' "${RESULTS[@]}"
  echo "files in $OUT:"
  ls -l "$OUT"
}

main 2>&1 | tee "$OUT/gpu_check.log"

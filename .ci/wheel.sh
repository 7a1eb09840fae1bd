#!/usr/bin/env bash
# The installed product, as a user gets it: build scaletrain's wheel and the example plugin's
# (examples/scaletrain_lion), install both into a fresh venv, and drive every command from an empty folder
# outside the repo (so nothing can be read from the clone by accident):
#   - the plugin's own tests (Lion against the paper's update, the sliding-window mask);
#   - a tiny training run of the built-in model;
#   - a tiny study of Lion vs AdamW (tune -> paired seeds -> report) from the plugin's recipe;
#   - a run with the plugin's attention through checkpoint, resume, sample, eval, bench and the dry run;
#   - Hugging Face export refusing the plugin's attention (one line, exit 2).
# Usage: bash .ci/wheel.sh   (called by .ci/run; SCALETRAIN_SHARED overrides where ../shared is)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${SCALETRAIN_SHARED:-$(cd "$repo/.." && pwd)/shared}
data="$shared/data/tinystories"
work=$(mktemp -d /tmp/scaletrain-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
say() { printf '\n== %s\n' "$*"; }
expect() {  # expect <pattern> <file>: the file holds the pattern, else show the file and fail
    grep -q -- "$1" "$2" || { echo "expected '$1' in $2:"; tail -30 "$2"; exit 1; }
}

say "build the wheels"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
pip install --quiet torch==2.13.0  # the local CPU wheel first (any other pin pulls CUDA)
pip wheel --quiet --no-deps -w "$work/dist" "$repo" "$repo/examples/scaletrain_lion"
ls "$work/dist"
# unzip with a name lists only that entry and fails without it (no `| grep -q`: under pipefail its early exit
# kills unzip with SIGPIPE, a false "missing" once the listing outgrows one stdio buffer)
unzip -Z1 "$work"/dist/scaletrain-*.whl "scaletrain/conf/config.yaml" > /dev/null || { echo "no configs in the wheel"; exit 1; }
pip install --quiet "$work"/dist/*.whl pytest

mkdir "$work/user" && cd "$work/user"  # an empty folder: no clone, no conf/ beside it
common=(debug=cpu_tiny "data.path=$data" "data.cache_dir=$work/cache" logging.wandb.mode=disabled)

say "plugin tests"
python -m pytest -q -p no:cacheprovider "$repo/examples/scaletrain_lion/tests"

say "a tiny run of the built-in model"
scaletrain-run "${common[@]}" hydra.run.dir=plain >plain.out 2>&1 || { tail -30 plain.out; exit 1; }
expect "done: step 20" plain.out

say "a tiny study: Lion vs AdamW"
python -m scaletrain.study experiment=lion_vs_adamw "${common[@]}" study.dir=study \
    train.max_steps=4 train.eval_every=2 train.ckpt_every=2 study.seeds=[1,2] study.max_widen=0 study.min_grid=2 \
    "study.arms.adamw.grid=[0.004,0.008]" "study.arms.lion.grid=[0.0004,0.0008]" >study.out 2>&1 \
    || { tail -40 study.out; exit 1; }
test -f study/report/report.md || { echo "no study report"; tail -30 study.out; exit 1; }
expect "lion" study/report/report.md
scaletrain-report --check study/report

say "the plugin's attention: train, checkpoint, resume, sample, eval, bench, dry run"
attn=(model/attention=sliding_window model.attention.window=8 train.ckpt_every=10)
scaletrain-run "${common[@]}" "${attn[@]}" train.max_steps=10 hydra.run.dir=swa >swa1.out 2>&1 || { tail -30 swa1.out; exit 1; }
scaletrain-run "${common[@]}" "${attn[@]}" train.max_steps=20 train.resume=auto hydra.run.dir=swa >swa2.out 2>&1 \
    || { tail -30 swa2.out; exit 1; }
expect "at step 10" swa/run.log
expect "done: step 20" swa2.out
scaletrain-sample swa --n 1 --max-new-tokens 8 >sample.out 2>&1 || { tail -20 sample.out; exit 1; }
scaletrain-eval swa "data.path=$data" "data.cache_dir=$work/cache" >eval.out 2>&1 || { tail -20 eval.out; exit 1; }
test -f swa/eval.json
scaletrain-bench "${common[@]}" "${attn[@]}" --steps 2 --warmup 1 --out bench.json >bench.out 2>&1 \
    || { tail -20 bench.out; exit 1; }
test -f bench.json
scaletrain-run "${common[@]}" "${attn[@]}" train.dry_run=true hydra.run.dir=dry >dry.out 2>&1 || { tail -20 dry.out; exit 1; }
test -f dry/sizing.json

say "export refuses the plugin's attention"
set +e
scaletrain-export-hf swa hf >export.out 2>&1
code=$?
set -e
[ "$code" = 2 ] || { echo "export exited $code, expected 2"; cat export.out; exit 1; }
expect "model.attention=sliding_window" export.out
say "wheel checks passed"

#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine that has no network: run here, in the repo root,
# with the project's venv active (. .venv/bin/activate), where PyPI is reachable.
#
#   .whl/       wheels of the packages scaletrain imports that the GPU image lacks, at exactly the versions
#               installed in this venv (Python 3.12, manylinux x86_64 / pure Python)
#   .gpu_data/  the TinyStories sample (train.txt, valid.txt) and the GPT-2 BPE files, copied from ../shared
#               (which does not travel to the GPU machine)
#
# Both are git-ignored; a device call carries them: run(carry=[".whl", ".gpu_data"], command="bash
# scripts/gpu_check.sh"). The whole working tree plus carried folders must stay under 64 MiB.
#
# The GPU image (torch 2.11 + CUDA 13, Python 3.12) already has torch, numpy, tokenizers, pyarrow, pandas,
# fsspec, huggingface-hub, xxhash, tqdm, pyyaml, packaging, cloudpickle, pytest; it lacks hydra-core,
# omegaconf, antlr4-python3-runtime, submitit, hydra-submitit-launcher, datasets (+ dill, multiprocess) and
# wandb. wandb is imported only when logging.wandb.mode is not disabled (gpu_check.sh disables it), and with
# its own missing dependencies it adds ~24 MB: WITH_WANDB=1 fetches it too.
#
# Usage: bash scripts/fetch_gpu_wheels.sh          (WITH_WANDB=1 for wandb; SCALETRAIN_SHARED for ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHL=.whl
DATA=.gpu_data
SHARED=${SCALETRAIN_SHARED:-../shared}
LIMIT_MB=48  # of .whl + .gpu_data: leaves the working tree (~1 MB) and headroom under the 64 MiB that travels

# What scaletrain needs that the image lacks; fsspec is carried although the image has one because datasets
# pins fsspec<=2026.9.0 (small, and only datasets on the GPU machine imports it).
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime submitit hydra-submitit-launcher datasets dill multiprocess fsspec)
# wandb and those of its dependencies the image lacks (it has protobuf, requests, click, anyio, httpx, ...)
WANDB_PACKAGES=(wandb cwevals distro sniffio pydantic pydantic-core annotated-types typing-inspection platformdirs
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport googleapis-common-protos)
# Packages the GPU image already has (KINDS.md's list, normalized), for the dependency check below.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

want=("${PACKAGES[@]}")
[[ ${WITH_WANDB:-0} == 1 ]] && want+=("${WANDB_PACKAGES[@]}")

version_of() {  # the version installed in this venv (exact pins: what the tests here ran against)
  "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

rm -rf "$WHL"  # one version of each package: two of one name stop the install on the GPU machine
mkdir -p "$WHL"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in "${want[@]}"; do
  pin="$pkg==$(version_of "$pkg")"
  echo "fetching $pin"
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$WHL" "$pin" 2>/dev/null; then
    # some pure-Python packages ship only an sdist (antlr4-python3-runtime 4.9.3): build its wheel here
    echo "  no wheel on the index: building one from the sdist"
    "$PY" -m pip wheel -q --no-deps -w "$WHL" "$pin"
  fi
done

# Every wheel must be pure Python or built for CPython 3.12 on manylinux x86_64.
for w in "$WHL"/*.whl; do
  case "$w" in
    *-py3-none-any.whl | *-py312-none-any.whl | *-cp312-*manylinux*x86_64.whl | *-py3-none-manylinux*x86_64.whl) ;;
    *) echo "error: $w is not installable on the GPU machine (Python 3.12, x86_64)" >&2; exit 1 ;;
  esac
done

# Every requirement of every carried wheel must be carried or on the GPU image (extras and markers that do
# not hold on Python 3.12 / Linux skipped).
DEVICE_HAS="$DEVICE_HAS" "$PY" - "$WHL" <<'EOF'
import os, re, sys, zipfile
from pathlib import Path
from packaging.markers import Marker
from packaging.requirements import Requirement

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
carried, reqs = {}, {}
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
    carried[name] = w
    reqs[name] = [Requirement(r) for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M)]
have = set(carried) | {norm(n) for n in os.environ["DEVICE_HAS"].split()}
missing = sorted({f"{norm(r.name)} (for {who})" for who, rs in reqs.items() for r in rs
                  if (r.marker is None or r.marker.evaluate(env)) and norm(r.name) not in have})
if missing:
    sys.exit("error: carried wheels need packages that neither .whl nor the GPU image has: " + ", ".join(missing))
print(f"dependency check: every requirement of the {len(carried)} wheels is carried or on the GPU image")
EOF

# The data the training run of gpu_check.sh reads (data.path=.gpu_data/tinystories, GPT-2 tokenizer files).
rm -rf "$DATA"
mkdir -p "$DATA/tinystories" "$DATA/gpt2_tokenizer"
cp "$SHARED/data/tinystories/train.txt" "$SHARED/data/tinystories/valid.txt" "$DATA/tinystories/"
cp "$SHARED/data/gpt2_tokenizer/vocab.json" "$SHARED/data/gpt2_tokenizer/merges.txt" "$DATA/gpt2_tokenizer/"

echo
for w in "$WHL"/*.whl; do
  printf '  %10d  %s\n' "$(stat -c %s "$w")" "${w#"$WHL"/}"
done
whl_b=$(du -cb "$WHL" | tail -1 | cut -f1)
data_b=$(du -cb "$DATA" | tail -1 | cut -f1)
tree_b=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_b=$((whl_b + data_b + tree_b))
mb() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "carried: .whl $(mb "$whl_b") + .gpu_data $(mb "$data_b"); working tree $(mb "$tree_b"); total $(mb "$total_b") of 64 MiB"
if ((whl_b + data_b > LIMIT_MB * 1048576)); then
  echo "error: .whl + .gpu_data exceed $LIMIT_MB MiB: cut the data (e.g. a prefix of train.txt) or drop wandb" >&2
  exit 1
fi

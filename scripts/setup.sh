#!/usr/bin/env bash
# Set up fixmatch on a fresh machine: Fashion-MNIST, Chromium and its driver (Debian packages, when apt is available),
# a virtual environment in .venv, the CPU build of PyTorch, then the project with its test extras (pytest, Selenium
# for the labeling page's browser test, and the ruff and import-linter that .ci/run checks the code with).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && { [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] \
    || ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install dataset-fashion-mnist; fixmatch will download Fashion-MNIST instead" >&2
  # Chromium: the report test opens index.html in a real headless browser (skipped where it is absent).
  command -v chromium >/dev/null 2>&1 || $SUDO apt-get install -y -qq chromium >/dev/null \
    || echo "setup: could not install chromium; the report's browser test will be skipped" >&2
  # chromedriver: the labeling page test drives Chromium through Selenium (skipped where it is absent).
  command -v chromedriver >/dev/null 2>&1 || $SUDO apt-get install -y -qq chromium-driver >/dev/null \
    || echo "setup: could not install chromium-driver; the labeling page's browser test will be skipped" >&2
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Install torch first and pinned: an unpinned resolve would pull the multi-GB CUDA build.
# A local folder of wheels (PIP_FIND_LINKS, or /opt/wheels where it exists) is searched first.
FIND_LINKS=()
[ -z "${PIP_FIND_LINKS:-}" ] && [ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
python -c "import torch" 2>/dev/null || python -m pip install -q "${FIND_LINKS[@]}" torch==2.13.0
python -m pip install -q -e ".[test]"

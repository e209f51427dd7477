#!/usr/bin/env bash
# Download, on a machine with internet access to PyPI, the wheels that tools/gpu_check.sh needs on
# a GPU machine whose image has PyTorch, CuPy and pytest but no notebook stack (nbval, ipykernel and
# their dependencies), for Python 3.12 on x86-64. They land in .whl/ (git-ignored by .gitignore) and
# travel with the device tool's `carry: [".whl"]`.
# pytest and its own plugins are left out so that the image's pytest is the one that runs.
# The versions are pinned to requirements.txt's; packages the image already has (pytest and its
# plugins, packaging, psutil, pygments, attrs, dateutil, typing-extensions, CuPy's cuda-pathfinder)
# are removed so that the image's own copies are the ones that run.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl nbval==0.11.0 ipykernel==7.4.0
rm -f .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/packaging-*.whl .whl/coverage-*.whl \
    .whl/psutil-*.whl .whl/pygments-*.whl .whl/attrs-*.whl .whl/python_dateutil-*.whl .whl/typing_extensions-*.whl
du -sh .whl

#!/usr/bin/env bash
# Does constraints.txt resolve for another Python version (default 3.12, the NGC PyTorch images')?
# pip's own resolver answers without that interpreter: `pip install --dry-run --python-version X
# --only-binary=:all:` resolves the package's requirements (setup.py INSTALL_REQUIRES + the test extra)
# under the constraints against the wheels PyPI has for X on manylinux x86_64, and writes pip's
# installation report. Packages that PyPI ships as an sdist only and that are pure Python
# (antlr4-python3-runtime, Hydra's parser) are built to a py3-none-any wheel first with this Python, as
# pip would build them inside the image. The resolved set is written as name==version lines.
# Usage: tools/resolve_for_python.sh [3.12] [pins.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
PINS="${2:-benchmarks/results/resolve_py${PYVER/./}.txt}"
PY="${PY:-.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
REPORT="$WORK/report.json"
"$PY" - > "$WORK/requirements.txt" <<'PYEOF'
import ast
tree = ast.parse(open("setup.py").read())
values = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if hasattr(t, "id")}
print("\n".join(ast.literal_eval(values["INSTALL_REQUIRES"]) + ast.literal_eval(values["EXTRAS"])["test"]))
PYEOF
"$PY" -m pip wheel -q --no-deps -c constraints.txt antlr4-python3-runtime==4.9.3 -w "$WORK/wheels"
# NGC images are Ubuntu 24.04 (glibc 2.39): every manylinux tag up to it; pip takes --platform literally
PLATFORMS=(--platform linux_x86_64 --platform manylinux2014_x86_64)
for minor in $(seq 5 39); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
"$PY" -m pip install --dry-run --ignore-installed --target "$WORK/target" --python-version "$PYVER" \
    --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none "${PLATFORMS[@]}" \
    --only-binary=:all: --find-links "$WORK/wheels" -c constraints.txt \
    -r "$WORK/requirements.txt" --report "$REPORT" -q
"$PY" - "$REPORT" "$PYVER" "$PINS" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
pins = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
with open(sys.argv[3], "w") as f:
    f.write(f"# tools/resolve_for_python.sh {sys.argv[2]}: pip's resolution of the package + [test] under "
            f"constraints.txt for CPython {sys.argv[2]}, manylinux x86_64\n")
    f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
print(f"constraints.txt resolves for Python {sys.argv[2]}: {len(pins)} packages "
      f"(torch {pins.get('torch')}, nemo_toolkit {pins.get('nemo-toolkit', pins.get('nemo_toolkit'))}, "
      f"megatron-core {pins.get('megatron-core')}); written to {sys.argv[3]}")
PYEOF

#!/usr/bin/env bash
# Everything a fresh machine needs to build, test and benchmark l2m-kernels (CPU; idempotent).
# torch is pinned to the CPU build 2.13.0 when torch is missing; an existing torch (>= 2.6) is kept,
# and nothing here may pull another torch (the package installs with --no-deps).
#
# A second run with nothing changed takes seconds: a requirement already installed at an
# acceptable version is not reinstalled, and the package is not rebuilt when this Python's
# l2m-kernels is an editable install of this tree, its extensions are in place, and the stamp
# build/install-<python ABI>.stamp records a build from the same sources (csrc/, setup.py,
# pyproject.toml), torch, compiler and build variables. Each skip is printed with its reason;
# FORCE=1 rebuilds anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
  echo "install.sh: skip torch: $("$PY" -c "import torch; print(torch.__version__)") is installed (>= 2.6 kept)"
else
  "$PY" -m pip install -q "torch==2.13.0"
fi

# The build requirements of pyproject.toml (pip does not install them with --no-build-isolation),
# then those of the tests and benchmarks (transformers: the Hugging Face integration's tests); with
# --peers also the peers l2m-bench compares with
# (faiss-cpu, product-key-memory: the "peers" extra of setup.py), each distribution:module.
REQUIREMENTS=("setuptools>=64" wheel "triton>=3.3" numpy ninja pybind11 pytest hypothesis matplotlib
              tqdm "transformers>=5")
for argument in "$@"; do
  case "$argument" in
    --peers) REQUIREMENTS+=("faiss-cpu:faiss" "product-key-memory:product_key_memory") ;;
    *) echo "install.sh: unknown argument $argument (known: --peers)" >&2; exit 2 ;;
  esac
done
# The requirements that are missing (no distribution or no importable module) or too old.
missing=$("$PY" - "${REQUIREMENTS[@]}" <<'EOF'
import importlib.util
import re
import sys
from importlib import metadata


def release(version):
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))


for requirement in sys.argv[1:]:
    requirement, _, module = requirement.partition(":")  # "faiss-cpu:faiss": its module's name
    name, _, minimum = requirement.partition(">=")
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = None
    if version is None or importlib.util.find_spec(module or name) is None or (
            minimum and release(version) < release(minimum)):
        print(requirement)
EOF
)
if [ -n "$missing" ]; then
  echo "install.sh: installing what is missing or too old:" $missing
  # shellcheck disable=SC2086  # one requirement per word
  "$PY" -m pip install -q $missing
else
  echo "install.sh: skip pip: ${REQUIREMENTS[*]%%:*} are installed at acceptable versions"
fi

# The package: "skip <reason>" when the installed build is current, else "build <reason>" and the
# stamp to write after a successful build.
decision=$("$PY" - <<'EOF'
import glob
import hashlib
import json
import os
import subprocess
import sysconfig
import urllib.parse
import urllib.request
from importlib import metadata

import torch

root = os.getcwd()
soabi = sysconfig.get_config_var("SOABI") or "unknown"
stamp = os.path.join("build", f"install-{soabi}.stamp")

digest = hashlib.sha256()
for path in sorted(glob.glob("csrc/**/*", recursive=True)) + ["setup.py", "pyproject.toml"]:
    if os.path.isfile(path):
        digest.update(path.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
facts = {
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "soabi": soabi,
    # The variables setup.py and torch's build read (unset and empty differ for L2M_CPU_ARCH).
    "env": {name: os.environ.get(name) for name in (
        "L2M_CPU_ARCH", "L2M_SANITIZE", "L2M_SKIP_CUDA", "L2M_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST",
        "CUDA_HOME", "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")},
}
try:
    compiler = os.environ.get("CXX", "c++")
    facts["compiler"] = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                       timeout=30).stdout.splitlines()[:1]
except (OSError, subprocess.SubprocessError):
    facts["compiler"] = None
digest.update(json.dumps(facts, sort_keys=True).encode())
wanted = digest.hexdigest()


def reason_to_build():
    if os.environ.get("FORCE", "") not in ("", "0"):
        return "FORCE is set"
    try:
        distribution = metadata.distribution("l2m-kernels")
    except metadata.PackageNotFoundError:
        return "l2m-kernels is not installed for this Python"
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    url = direct_url.get("url", "")
    if not direct_url.get("dir_info", {}).get("editable"):
        return "the installed l2m-kernels is not an editable install"
    installed_from = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if os.path.realpath(installed_from) != os.path.realpath(root):
        return f"the installed l2m-kernels is an editable install of {url}, not of this tree"
    if not os.path.exists(stamp):
        return f"no stamp of a build from this tree for this Python ({stamp})"
    with open(stamp) as f:
        recorded = json.load(f)
    if recorded.get("hash") != wanted:
        return "sources, torch, compiler or build variables changed since the last build"
    gone = [path for path in recorded.get("extensions", []) if not os.path.exists(path)]
    if gone or not recorded.get("extensions"):
        return f"built extension missing: {', '.join(gone) or 'none recorded'}"
    return None


why = reason_to_build()
print(json.dumps({"skip": why is None, "why": why or "", "stamp": stamp, "hash": wanted}))
EOF
)
field() { "$PY" -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$decision" "$1"; }
stamp=$(field stamp)
if [ "$(field skip)" = "True" ]; then
  echo "install.sh: skip the package build: this tree's editable install is current ($stamp)"
  exit 0
fi
echo "install.sh: building the package: $(field why)"
rm -f "$stamp"
start=$(date +%s)
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "install.sh: package built in $(( $(date +%s) - start )) s"
mkdir -p build
"$PY" - "$stamp" "$(field hash)" <<'EOF'
import glob
import json
import sys
import sysconfig

stamp, digest = sys.argv[1:]
suffix = sysconfig.get_config_var("EXT_SUFFIX")
extensions = sorted(glob.glob(f"l2m_kernels/*{suffix}"))
with open(stamp, "w") as f:
    json.dump({"hash": digest, "extensions": extensions}, f, indent=1)
EOF

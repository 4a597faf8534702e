"""pyproject maps passes/ to mst_fx.passes: both a regular and an editable install find it,
with every stage's subpackage.

Each install goes into a throwaway venv (--no-deps, so no torch there); the probe resolves
``mst_fx.passes`` through the import system from outside the source tree without running
mst_fx's __init__ (which needs torch), so it sees the install's own mapping.
"""

import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import importlib.util, os, sys, types
spec = importlib.util.find_spec("mst_fx")
parent = types.ModuleType("mst_fx")
parent.__path__ = list(spec.submodule_search_locations)
sys.modules["mst_fx"] = parent
passes = importlib.util.find_spec("mst_fx.passes")
print(os.path.realpath(passes.origin))
here = os.path.dirname(passes.origin)
files = ["graph/mlp.py", "graph/lm_head/emit.py", "graph/attention/prover.py",
         "joint/embedding_recompute.py", "post_grad/pipeline.py"]
print(all(os.path.exists(os.path.join(here, f)) for f in files))
"""


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_imports_passes(tmp_path, editable):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    target = ["-e", ROOT] if editable else [ROOT]
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *target],
                   check=True, cwd=tmp_path, capture_output=True)
    out = subprocess.run([python, "-c", PROBE], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout.split("\n")
    assert out[1] == "True"
    if editable:
        assert out[0] == os.path.realpath(os.path.join(ROOT, "passes", "__init__.py"))
    else:  # the package-dir mapping put passes/ inside the installed package
        assert out[0] == os.path.realpath(
            env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "site-packages" / "mst_fx" / "passes" / "__init__.py")

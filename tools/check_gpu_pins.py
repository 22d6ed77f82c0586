"""Check that the GPU set (``tools/gpu-constraints.txt``: torch, vLLM, TRL, transformers, huggingface_hub, ...) holds
together, without a GPU and without downloading a CUDA wheel.

``make install-gpu`` installs ``.[gpu]`` under these constraints. Here, one ``pip install --dry-run --no-deps
--report`` fetches the *metadata* of every pinned release (no wheel is installed; from a registry that serves wheel
metadata on its own, PyPI does, not even the wheel is downloaded), then every requirement that a pinned package, this
project (its base dependencies and the ``gpu`` extra) or the ``gpu`` extra's own packages place on another pinned
package is checked against the pin. A failure names the package, the requirement and the pin, and exits 1.

    python tools/check_gpu_pins.py [--constraints tools/gpu-constraints.txt] [--torch torch==2.13.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, "tools", "gpu-constraints.txt")


def read_pins(path: str) -> dict[str, Version]:
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            spec = list(req.specifier)
            if len(spec) != 1 or spec[0].operator != "==":
                raise SystemExit(f"{path}: {line!r} is not an exact pin (name==version)")
            pins[canonicalize_name(req.name)] = Version(spec[0].version)
    return pins


def project_requirements(extras: tuple[str, ...] = ("gpu",)) -> list[tuple[str, Requirement]]:
    """This project's base dependencies and those of ``extras`` with the extras they pull in, from its installed
    metadata (``make check-gpu-pins`` reinstalls first when pyproject.toml changed)."""
    from importlib.metadata import requires

    name = "hdpissa-trl"
    reqs = [Requirement(r) for r in requires(name) or []]
    out = [("hdpissa_trl", r) for r in reqs if r.marker is None]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in reqs:
            if req.marker is None or not req.marker.evaluate({**default_environment(), "extra": extra}):
                continue
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:  # the extra's marker holds here: keep the requirement without it
                out.append((f"hdpissa_trl[{extra}]", Requirement(str(req).split(";", 1)[0])))
    return out


def metadata(pins: dict[str, Version]) -> dict[str, list[str]]:
    """``Requires-Dist`` of every pinned release, from pip's dry-run report (metadata only)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
               "--report", report, *[f"{n}=={v}" for n, v in pins.items()]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"pip could not find every pinned release:\n{proc.stderr[-3000:]}")
        with open(report, encoding="utf-8") as f:
            installs = json.load(f)["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"].get("requires_dist") or [] for i in installs}


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def check(pins: dict[str, Version], requires: dict[str, list[str]],
          project: list[tuple[str, Requirement]]) -> list[str]:
    """Every requirement on a pinned package, from the project or a pinned package, that its pin does not meet."""
    extras_of: dict[str, set[str]] = {}  # the extras asked of each pinned package (e.g. trl[vllm])
    for _, req in project:
        extras_of.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    problems = []
    edges = [(who, req, set()) for who, req in project]
    edges += [(f"{name} {pins[name]}", Requirement(r), extras_of.get(name, set()))
              for name, reqs in requires.items() for r in reqs]
    for who, req, extras in edges:
        target = canonicalize_name(req.name)
        if target in pins and applies(req, extras) and not req.specifier.contains(pins[target], prereleases=True):
            problems.append(f"{who} requires {req}, but the pin is {target}=={pins[target]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--constraints", default=CONSTRAINTS)
    ap.add_argument("--torch", default=None, help="the torch the install uses (must equal the pin), e.g. torch==2.13.0")
    args = ap.parse_args(argv)
    pins = read_pins(args.constraints)
    if args.torch:
        torch = Requirement(args.torch)
        if "torch" not in pins or not torch.specifier.contains(pins["torch"]):
            print(f"check-gpu-pins: the install asks for {args.torch}, the constraints pin torch=={pins.get('torch')}")
            return 1
    requires = metadata(pins)
    missing = sorted(set(pins) - set(requires))
    problems = check(pins, requires, project_requirements())
    problems += [f"no metadata for {m}=={pins[m]}" for m in missing]
    for p in problems:
        print(f"check-gpu-pins: {p}")
    if problems:
        return 1
    print("check-gpu-pins: " + ", ".join(f"{n}=={v}" for n, v in pins.items()) + " hold together with this project's "
          "requirements (base and the gpu extra).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

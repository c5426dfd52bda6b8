"""The wheels the GPU benchmarks need on a machine that cannot download, and the check that the
environment there has what they import.

    make gpu-kit                                        # here, where pip can download: installs the
                                                        # `bench` extra, then `gpu_kit.py build`
    python benchmarks/gpu_kit.py build [--out .whl]     # the same, once the `bench` extra is installed
    python benchmarks/gpu_kit.py check                  # there, after installing the wheels

The GPU machines run an image with torch, accelerate and an older transformers, but without
datasets, mlflow, math-verify or trl, and nothing can be fetched there (benchmarks/gpu_image.txt
lists its packages). `build` walks the requirements of what the GPU scripts import (the
project's runtime dependencies from pyproject.toml, less the orchestration ones, plus the `bench`
extra) through this environment's installed metadata, so the versions are the ones `make test`
runs; it keeps a package out when the image has it at a version every requirement accepts (or
at a version not recorded), and downloads the rest as wheels for the image's Python, one version
each, no dependencies. torch and its CUDA libraries always come from the image (a CUDA torch
wheel is over the size a device call carries); transformers is always carried (the image's is
older than the pin). `check` walks the same requirements through the environment it runs in
and prints every requirement that is missing or unmet, with the versions found: exit 1 if any.
`bash benchmarks/gpu_all.sh` installs the wheels into /tmp/site and runs `check` first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
# What the GPU scripts never import: the Prefect flow, DVC and team mode's PostgreSQL driver.
NOT_ON_GPU = {"prefect", "dvc", "psycopg"}
# From the image, whatever this environment has: the CUDA build there is the point.
FROM_IMAGE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
ALWAYS_CARRY = {"transformers"}
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def root_requirements(pyproject: Path = ROOT / "pyproject.toml",
                      extras: tuple[str, ...] = ("bench",)) -> list[Requirement]:
    import tomllib  # Python 3.11+, as on the machines this runs on

    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [r for r in map(Requirement, wanted) if normalize(r.name) not in NOT_ON_GPU]


def walk(roots: list[Requirement], installed_version, requires, environment: dict) -> tuple[dict, dict]:
    """Breadth-first over requirements: ({name: version found}, {name: [requirements on it]}).
    `installed_version(name)` is None for a missing package; `requires(name)` its requirement
    strings. Markers are evaluated for `environment` (extras: only those asked for)."""
    found, wanted, seen, queue = {}, {}, set(), [(r, "") for r in roots]
    while queue:
        req, extra = queue.pop(0)
        if req.marker is not None and not req.marker.evaluate({**environment, "extra": extra}):
            continue
        name = normalize(req.name)
        wanted.setdefault(name, []).append(req)
        if name not in found:
            found[name] = installed_version(name)
        if found[name] is None:
            continue
        for asked in (req.extras or set()) | {""}:
            if (name, asked) in seen:  # a package's own dependencies once, and each extra's once
                continue
            seen.add((name, asked))
            for text in requires(name):
                try:
                    child = Requirement(text)
                except InvalidRequirement:
                    print(f"gpu_kit: {name}'s requirement {text!r} is not PEP 508: skipped", file=sys.stderr)
                    continue
                own = child.marker is None or child.marker.evaluate({**environment, "extra": ""})
                if own == (asked == ""):
                    queue.append((child, asked))
    return found, wanted


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _requires(name: str) -> list[str]:
    # Below torch and its CUDA libraries the image's own versions rule, not this environment's.
    return [] if FROM_IMAGE.match(name) else metadata.requires(name) or []


def target_environment(python_version: str) -> dict:
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython", os_name="posix")
    return env


def read_image(path: Path) -> dict[str, str | None]:
    """{name: version or None} from a package list: `name` or `name==version` lines, as `pip
    freeze` on that machine writes them (`name @ url` lines count as version unknown)."""
    image = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.split(" @ ")[0].partition("==")
            image[normalize(name.strip())] = version.strip() or None
    return image


def satisfies(version: str | None, requirements: list[Requirement]) -> bool:
    if version is None:
        return True  # not recorded: trust the image; `check` on the machine says otherwise
    try:
        return all(r.specifier.contains(Version(version), prereleases=True) for r in requirements)
    except InvalidVersion:
        return False


def to_carry(found: dict, wanted: dict, image: dict) -> dict[str, str]:
    """{name: version} to download: what the image lacks or has at a version some requirement
    refuses, and ALWAYS_CARRY; never FROM_IMAGE."""
    carry = {}
    for name, version in sorted(found.items()):
        if FROM_IMAGE.match(name):
            continue
        if version is None:
            # `make install` installs no `bench` extra (trl): `make gpu-kit` does, then builds.
            raise SystemExit(f"gpu_kit: {name} is required but not installed here: run `make gpu-kit`, or "
                             "`pip install -e '.[bench]'` into this environment")
        if name in ALWAYS_CARRY or name not in image or not satisfies(image[name], wanted[name]):
            carry[name] = version
    return carry


def build(out: Path, python_version: str, limit_mib: float, image_file: Path) -> int:
    found, wanted = walk(root_requirements(), _installed_version, _requires, target_environment(python_version))
    carry = to_carry(found, wanted, read_image(image_file))
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.whl"), out / "TARGET"]:  # TARGET is written last: a failed build has none
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(out)]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    for name, version in carry.items():
        downloaded = subprocess.run(cmd + [f"{name}=={version}"], capture_output=True, text=True)
        if downloaded.returncode == 0:
            continue
        # Some pure-Python packages publish only a source archive: build their wheel here, from
        # source only (a binary wheel built here would be for this Python, not the target's).
        before = set(out.glob("*.whl"))
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary", ":all:",
                                "-w", str(out), f"{name}=={version}"], capture_output=True, text=True)
        new = set(out.glob("*.whl")) - before
        if built.returncode or not new or not all(w.name.endswith("-none-any.whl") for w in new):
            for wheel in new:
                wheel.unlink()
            # pip's own words for both tries: "no matching distribution" and "network unreachable"
            # need different fixes.
            print(f"gpu_kit: no wheel of {name}=={version} for Python {python_version}: none to download, and "
                  f"none pure-Python to build from source\npip download: {downloaded.stderr.strip()[-600:]}\n"
                  f"pip wheel: {built.stderr.strip()[-600:]}", file=sys.stderr)
            return 1
    (out / "TARGET").write_text(python_version + "\n")  # gpu_all.sh refuses a kit built for another Python
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpu_kit: {len(wheels)} wheels, {size:.1f} MiB in {out} for Python {python_version}: "
          + ", ".join(f"{n}=={v}" for n, v in carry.items()))
    if size > limit_mib:
        print(f"gpu_kit: {size:.1f} MiB is over the {limit_mib:.0f} MiB a device call can carry beside the "
              "repository", file=sys.stderr)
        return 1
    return 0


def unmet(found: dict, wanted: dict) -> list[str]:
    """One line per requirement that `found` (name: version or None) leaves missing or unmet."""
    problems = []
    for name, version in sorted(found.items()):
        if version is None:
            problems.append(f"{name}: missing (wanted by {', '.join(sorted({str(r) for r in wanted[name]}))})")
        elif not FROM_IMAGE.match(name) and not satisfies(version, wanted[name]):
            refused = sorted({str(r) for r in wanted[name] if not satisfies(version, [r])})
            problems.append(f"{name} {version}: does not meet {', '.join(refused)}")
    return problems


def check() -> int:
    """Every requirement of the GPU scripts, met in this environment? (Run on the GPU machine.)"""
    import platform

    found, wanted = walk(root_requirements(), _installed_version, _requires,
                         target_environment(".".join(platform.python_version_tuple()[:2])))
    shown = ("torch", "transformers", "accelerate", "datasets", "mlflow", "trl", "huggingface-hub", "tokenizers")
    print("gpu_kit check: " + ", ".join(f"{n} {found.get(n)}" for n in shown))
    problems = unmet(found, wanted)
    for line in problems:
        print(f"gpu_kit check: {line}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the wheels (here)")
    b.add_argument("--out", type=Path, default=ROOT / ".whl")
    b.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    b.add_argument("--image", type=Path, default=ROOT / "benchmarks" / "gpu_image.txt",
                   help="the target machine's packages (`pip freeze` there); default: the device image's")
    b.add_argument("--limit-mib", type=float, default=56.0)
    sub.add_parser("check", help="report unmet requirements (on the GPU machine)")
    args = parser.parse_args()
    if args.command == "build":
        return build(args.out, args.python_version, args.limit_mib, args.image)
    return check()


if __name__ == "__main__":
    sys.exit(main())

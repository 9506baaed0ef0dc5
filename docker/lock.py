"""Write docker/requirements.lock: the image's runtime lock, every file pinned by sha256.

The repo-root requirements.lock is resolved on this CPU machine; in the image the same pins must
hold for Linux x86_64 / CPython 3.11, where torch pulls in its CUDA wheels. This script starts from
those pins plus the image-only pins in docker/image-only.txt (CUDA-only packages such as
bitsandbytes), reads each chosen wheel's METADATA straight out of the wheel on PyPI with HTTP range
requests (a few hundred KiB even for torch's 500 MB wheel), adds whatever the target platform needs
on top (the nvidia-*/cuda-* wheels, triton), and writes every requirement with its hashes.

The data-only pins of requirements-data.lock (installed --no-deps: open-clip-torch for CLIP's BPE
merges) are added as they are, their dependencies not walked.

Regenerate after changing requirements.lock, docker/image-only.txt or requirements-data.lock:

    .venv/bin/python docker/lock.py            # writes docker/requirements.lock
    .venv/bin/python docker/lock.py --check    # exit 1 if the file is stale

Only the PyPI JSON API and range reads are used; nothing large is downloaded.

For a build without registry access (make image), the host fills a wheelhouse with exactly the
locked files, hashes checked, for the image's platform rather than the host's:

    .venv/bin/python docker/lock.py --wheelhouse .work/image/wheels
"""

import argparse
import functools
import io
import json
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SOURCE_LOCK = ROOT / "requirements.lock"
IMAGE_ONLY = ROOT / "docker" / "image-only.txt"
# Packages used as data only (installed --no-deps everywhere): pinned and hashed, dependencies not walked.
DATA_ONLY = ROOT / "requirements-data.lock"
TARGET_LOCK = ROOT / "docker" / "requirements.lock"
PYPI = "https://pypi.org/pypi"

# The image's interpreter and platform (CPython 3.11 on glibc 2.28 or newer: manylinux_2_28 and older).
PYTHON = (3, 11)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
TAGS = set(cpython_tags(PYTHON, platforms=PLATFORMS)) | set(
    compatible_tags(PYTHON, platforms=PLATFORMS)
)
MARKER_ENV = default_environment() | {
    "implementation_name": "cpython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "python_version": "3.11",
    "python_full_version": "3.11.13",
    "platform_python_implementation": "CPython",
}


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file that fetches only the byte ranges read."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos >= self.size or not len(buffer):
            return 0
        end = min(self.pos + len(buffer), self.size) - 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


_projects: dict[str, dict] = {}


def project(name: str) -> dict:
    """PyPI's JSON for a project (all releases, with digests)."""
    key = canonicalize_name(name)
    if key not in _projects:
        with urllib.request.urlopen(f"{PYPI}/{key}/json", timeout=120) as response:
            _projects[key] = json.load(response)
    return _projects[key]


def target_files(name: str, version: str) -> list[dict]:
    """The release's files pip may pick for the image: compatible wheels, else the sdist."""
    files = [f for f in project(name)["releases"].get(version, []) if not f.get("yanked")]
    wheels = [
        f
        for f in files
        if f["filename"].endswith(".whl") and TAGS & set(parse_wheel_filename(f["filename"])[3])
    ]
    return wheels or [f for f in files if f["packagetype"] == "sdist"]


@functools.cache
def requires_dist(name: str, version: str) -> list[Requirement]:
    """Requirements from the wheel's METADATA, read with range requests."""
    wheel = next((f for f in target_files(name, version) if f["filename"].endswith(".whl")), None)
    if wheel is None:
        sys.exit(f"{name}=={version}: no wheel for the image platform; pin one that has it")
    url = wheel["url"]
    if url.startswith("../"):  # some mirrors return relative links
        url = "https://files.pythonhosted.org/packages/" + url.split("/packages/packages/", 1)[1]
    remote = io.BufferedReader(RangeFile(url, wheel["size"]), buffer_size=256 * 1024)
    with zipfile.ZipFile(remote) as archive:
        path = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(path).decode()
    lines = [line[len("Requires-Dist:") :].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [Requirement(line) for line in lines]


def needed(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(MARKER_ENV | {"extra": extra}) for extra in extras | {""})


def newest(name: str, requirements: list[Requirement]) -> str:
    """Highest release that satisfies every requirement on it and has a file for the image."""
    for version in sorted(map(Version, project(name)["releases"]), reverse=True):
        if version.is_prerelease or not target_files(name, str(version)):
            continue
        if all(r.specifier.contains(version) for r in requirements):
            return str(version)
    sys.exit(f"nothing on PyPI satisfies all of {[str(r) for r in requirements]}")


def read_pins(path: Path) -> dict[str, str]:
    """name==version lines (comments, blank lines and `--hash` continuations skipped), local versions dropped."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().removesuffix("\\").strip()
        if line and not line.startswith("--"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.split("+")[0]  # 2.13.0+cpu -> 2.13.0
    return pins


def resolve() -> dict[str, str]:
    """Start from requirements.lock's and image-only.txt's pins; add what the image platform needs."""
    pins = read_pins(SOURCE_LOCK)
    for name, version in read_pins(IMAGE_ONLY).items():
        if pins.setdefault(name, version) != version:
            sys.exit(f"{IMAGE_ONLY.name} pins {name}=={version}, requirements.lock {pins[name]}")
    fixed = set(pins)  # versions the CPU lock chose are kept; a conflict is an error
    extras: dict[str, set[str]] = {name: set() for name in pins}
    constraints: dict[str, list[Requirement]] = {}
    done: dict[str, tuple] = {}  # package -> (version, extras) its metadata was read with
    queue = list(pins)
    while queue:
        name = queue.pop()
        if done.get(name) == (pins[name], frozenset(extras[name])):
            continue
        done[name] = (pins[name], frozenset(extras[name]))
        for requirement in requires_dist(name, pins[name]):
            if not needed(requirement, extras[name]):
                continue
            dep = canonicalize_name(requirement.name)
            constraints.setdefault(dep, []).append(requirement)
            if dep not in pins or not requirement.specifier.contains(pins[dep], prereleases=True):
                if dep in fixed:
                    sys.exit(f"{dep}=={pins[dep]} does not satisfy {name}'s {requirement}")
                pins[dep] = newest(dep, constraints[dep])
                print(f"  + {dep}=={pins[dep]} (for {name})", file=sys.stderr)
            extras.setdefault(dep, set()).update(requirement.extras)
            queue.append(dep)
    return verified(pins, fixed, extras) | read_pins(DATA_ONLY)


def verified(pins: dict[str, str], roots: set[str], extras: dict[str, set[str]]) -> dict[str, str]:
    """Walk the final pins from the roots: drop what a replaced version needed, check every pin."""
    reached, queue = set(roots), list(roots)
    while queue:
        name = queue.pop()
        for requirement in requires_dist(name, pins[name]):
            if not needed(requirement, extras[name]):
                continue
            dep = canonicalize_name(requirement.name)
            if not requirement.specifier.contains(pins[dep], prereleases=True):
                sys.exit(f"{dep}=={pins[dep]} does not satisfy {name}'s {requirement}")
            if dep not in reached:
                reached.add(dep)
                queue.append(dep)
    return {name: version for name, version in pins.items() if name in reached}


def render(pins: dict[str, str]) -> str:
    lines = [
        "# The image's runtime lock: Linux x86_64, CPython 3.11, torch with its CUDA wheels from PyPI.",
        "# Generated by docker/lock.py from requirements.lock and docker/image-only.txt; do not edit.",
        "# Installed with pip install --require-hashes --no-deps, so every file is checked against",
        "# these hashes.",
    ]
    for name in sorted(pins):
        hashes = sorted({f["digests"]["sha256"] for f in target_files(name, pins[name])})
        lines.append(f"{name}=={pins[name]} \\")
        lines += [f"    --hash=sha256:{h} \\" for h in hashes[:-1]]
        lines.append(f"    --hash=sha256:{hashes[-1]}")
    return "\n".join(lines) + "\n"


def fill_wheelhouse(folder: Path) -> None:
    """pip download every file docker/requirements.lock names for the image platform into folder.

    --require-hashes: pip refuses any file whose sha256 is not in the lock, and the build installs
    from this folder with --no-index and the same hashes, so the image gets exactly the locked
    files. Files already in the folder are checked and kept, not fetched again.
    Raises SystemExit with pip's exit status when a download fails.
    """
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    abis = ["--abi", f"cp{PYTHON[0]}{PYTHON[1]}", "--abi", "abi3", "--abi", "none"]
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
        "--only-binary=:all:", "--implementation", "cp", "--python-version", "{}.{}".format(*PYTHON),
        *platforms, *abis, "--dest", str(folder), "--requirement", str(TARGET_LOCK),
    ]  # fmt: skip
    done = subprocess.run(command)
    if done.returncode:
        sys.exit(done.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the lock file is stale")
    parser.add_argument(
        "--wheelhouse", type=Path, metavar="DIR", help="download the locked files into DIR instead"
    )
    args = parser.parse_args()
    if args.wheelhouse:
        fill_wheelhouse(args.wheelhouse)
        return
    text = render(resolve())
    if args.check:
        if TARGET_LOCK.read_text() != text:
            sys.exit("docker/requirements.lock is stale: run .venv/bin/python docker/lock.py")
        return
    TARGET_LOCK.write_text(text)
    print(f"wrote {TARGET_LOCK.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

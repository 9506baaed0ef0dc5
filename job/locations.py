"""The overlap rule of CONTRACT.md §3: where the job reads, writes and deletes must not collide.

A location is a URI normalised for comparison: `s3://bucket/a//b/` → ("s3", "bucket", ("a", "b"));
a local path (`file://` optional, relative or with `~`) → ("file", "", parts of the resolved path,
symlinks followed). One location contains another when scheme and bucket match and its parts are a
leading run of the other's: `s3://b/data` contains `s3://b/data/x` but not `s3://b/database`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

Location = tuple[str, str, tuple[str, ...]]


def location(uri: str) -> Location | None:
    """The normalised form of `uri`; None for a URI no store accepts (reported elsewhere)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return ("s3", parsed.netloc, tuple(p for p in parsed.path.split("/") if p))
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        return None
    else:
        path = Path(uri).expanduser()
    return ("file", "", Path(path).resolve().parts)


def contains(outer: Location, inner: Location) -> bool:
    """True when `inner` is `outer` or lies under it."""
    return outer[:2] == inner[:2] and inner[2][: len(outer[2])] == outer[2]


def overlap_problems(instance: str, output: str, checkpoint: str, class_: str | None) -> list[str]:
    """Every violation of the overlap rule, one sentence each (empty when the layout is safe).

    The checkpoint prefix may not equal or contain the instance, class or output prefix (clean-up
    deletes under it); the output may not lie inside the instance prefix (a re-run would train on
    its own samples); the class prefix may not equal or contain the instance prefix (generated class
    images would land among the instance images). `class_` is None when the run uses no class images.
    """
    named = {"SDFT_INSTANCE_URI": instance, "SDFT_OUTPUT_URI": output, "SDFT_CHECKPOINT_URI": checkpoint}
    if class_ is not None:
        named["SDFT_CLASS_URI"] = class_
    where = {name: location(uri) for name, uri in named.items()}
    if None in where.values():
        return []

    def show(name: str) -> str:
        return f"{name} ({named[name]})"

    problems = []
    for other, harm in (("SDFT_INSTANCE_URI", "the instance images"), ("SDFT_CLASS_URI", "the class images"),
                        ("SDFT_OUTPUT_URI", "the published result")):
        if other in where and contains(where["SDFT_CHECKPOINT_URI"], where[other]):
            problems.append(f"{show('SDFT_CHECKPOINT_URI')} equals or contains {show(other)}: checkpoint "
                            f"clean-up could delete {harm}; give checkpoints a prefix of their own "
                            "(or leave SDFT_CHECKPOINT_URI unset)")
    if contains(where["SDFT_INSTANCE_URI"], where["SDFT_OUTPUT_URI"]):
        problems.append(f"{show('SDFT_OUTPUT_URI')} lies inside {show('SDFT_INSTANCE_URI')}: a re-run would train "
                        "on its own samples; write the output outside the instance prefix")
    if "SDFT_CLASS_URI" in where and contains(where["SDFT_CLASS_URI"], where["SDFT_INSTANCE_URI"]):
        problems.append(f"{show('SDFT_CLASS_URI')} equals or contains {show('SDFT_INSTANCE_URI')}: generated class "
                        "images would mix with the instance images; use a separate class prefix")
    return problems

"""Resumable training state in the bucket: `<CHECKPOINT_URI>/step-<N>/`, marker written last.

The state itself is accelerate's `save_state` (weights being trained, optimizer, LR schedule). The
marker `_COMPLETE` records the run's fingerprint and every file's size and sha256: a checkpoint
without it, with another fingerprint, or whose files don't match it, is never resumed from.
"""

import json
import shutil
from pathlib import Path

import structlog

from job import layout
from job.storage import Store
from job.digests import hash_tree, sha256_file
from job.distributed import local_main_first

log = structlog.get_logger()

MARKER = layout.CHECKPOINT_MARKER
KEEP = 2


CARRIED = "sdft"  # folder inside a checkpoint for the run's own files (e.g. metrics.jsonl so far)


class Checkpoints:
    """Checkpoints of one run under `store`; `carry` files travel with them (and come back on resume)."""

    def __init__(self, store: Store, fingerprint: str, local_dir: Path, keep: int = KEEP, carry: list[Path] = ()):
        self.store = store
        self.fingerprint = fingerprint
        self.local_dir = local_dir
        self.keep = keep
        self.carry = list(carry)
        self._saved_names: set[str] = set()  # file names of the checkpoints this process wrote

    def _steps_present(self) -> dict[int, set[str]]:
        steps: dict[int, set[str]] = {}
        for item in self.store.list():
            found = layout.checkpoint_step(item.key)
            if found:
                steps.setdefault(found[0], set()).add(found[1])
        return steps

    def _marker(self, step: int) -> dict | None:
        try:
            marker = json.loads(self.store.get(f"{layout.checkpoint_dir(step)}/{MARKER}"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict) or not marker["files"]:
            return None
        return marker

    def restore(self, accelerator) -> int:
        """Loads the newest usable checkpoint into `accelerator`; returns its step (0 if none).

        One process per machine picks and downloads it; every process then loads the same files.
        """
        choice = self.local_dir / "restore.json"

        def pick() -> int:
            choice.parent.mkdir(parents=True, exist_ok=True)
            choice.write_text(json.dumps(newest := self._fetch_newest_usable()))
            return newest

        step = local_main_first(accelerator, pick, others=lambda: json.loads(choice.read_text()))
        if step:
            restored = self.local_dir / f"restore-{step}"
            accelerator.load_state(str(restored))
            if accelerator.is_main_process:
                for path in self.carry:
                    if (restored / CARRIED / path.name).is_file():
                        shutil.copyfile(restored / CARRIED / path.name, path)
            log.info("checkpoint.resumed", step=step, uri=self.store.url(layout.checkpoint_dir(step) + "/"))
        return step

    def _fetch_newest_usable(self) -> int:
        for step in sorted(self._steps_present(), reverse=True):
            marker = self._marker(step)
            if marker is None:
                log.warning("checkpoint.ignored", step=step, reason="no completion marker (upload interrupted)")
                continue
            if marker.get("fingerprint") != self.fingerprint:
                log.warning("checkpoint.ignored", step=step, reason="made with other settings or inputs")
                continue
            local = self.local_dir / f"restore-{step}"
            shutil.rmtree(local, ignore_errors=True)
            try:
                self.store.child(layout.checkpoint_dir(step)).download_all(local, list(marker["files"]))
            except FileNotFoundError as error:  # a file the marker lists is gone (an interrupted prune)
                log.warning("checkpoint.ignored", step=step, reason=f"{error.filename} is missing")
                continue
            problem = _verify(local, marker["files"])
            if problem:
                log.warning("checkpoint.ignored", step=step, reason=problem)
                continue
            return step
        return 0

    def save(self, accelerator, step: int) -> None:
        """Saves the state on every process, uploads it from the main one, marker last; prunes old ones."""
        local = self.local_dir / layout.checkpoint_dir(step)
        if accelerator.is_main_process:
            shutil.rmtree(local, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(local))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path in self.carry:
                if path.is_file():
                    (local / CARRIED).mkdir(exist_ok=True)
                    shutil.copyfile(path, local / CARRIED / path.name)
            files = hash_tree(local)
            self._saved_names.update(files)
            target = self.store.child(layout.checkpoint_dir(step))
            target.delete([MARKER])  # a stale marker must not vouch for files being overwritten
            target.upload_tree(local)
            target.put(MARKER, json.dumps({"fingerprint": self.fingerprint, "step": step, "files": files}).encode())
            log.info("checkpoint.saved", step=step, uri=self.store.url(layout.checkpoint_dir(step) + "/"))
            self._prune(keep_from=step)
            shutil.rmtree(local, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _prune(self, keep_from: int) -> None:
        """Keeps the newest `keep` complete checkpoints up to `keep_from`; older and unfinished ones go."""
        present = self._steps_present()
        complete = sorted(s for s, files in present.items() if MARKER in files and s <= keep_from)
        unfinished = [s for s, files in present.items() if MARKER not in files and s < keep_from]
        self._delete(present, complete[: -self.keep] + unfinished)

    def clear(self) -> None:
        """Deletes the checkpoints sdft wrote here (after a successful run), and nothing else.

        The prefix may be shared with other data: only `step-<N>/` folders go, and of those only the
        files a marker lists (or, in a folder whose upload never finished, files named as sdft's are).
        """
        present = self._steps_present()
        self._delete(present, sorted(present))

    def _delete(self, present: dict[int, set[str]], steps: list[int]) -> None:
        markers = {step: self._marker(step) for step in steps if MARKER in present[step]}
        ours = {MARKER, *self._saved_names, *(name for m in markers.values() if m for name in m["files"])}
        for step in steps:
            # Marker first: if deletion stops halfway, what is left is visibly incomplete.
            names = set(markers[step]["files"]) if markers.get(step) else present[step] & ours
            folder = layout.checkpoint_dir(step)
            self.store.delete([f"{folder}/{MARKER}"] if MARKER in present[step] else [])
            self.store.delete([f"{folder}/{name}" for name in sorted(names & present[step])])


def _verify(folder: Path, files: dict) -> str | None:
    for name, expected in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            return f"{name} is missing or does not match its recorded checksum (truncated upload?)"
    return None

"""Saves that a kill cannot leave half-written, and output directories that one run owns.

A save is several files (the PEFT adapter, ``selection.json``, ``unlearn_config.json``, the tokenizer; a checkpoint
adds the optimizer, scheduler, RNG and trainer state). Written in place, a kill in the middle leaves a folder whose
files come from two runs, which PEFT and this package then read as two different models. So:

- **Final saves** (``Trainer.save_model``) are written into a staging folder inside the target
  (:data:`STAGING_DIR`), then moved into place file by file (``os.replace``, atomic per file) and finished by a
  marker, :data:`SAVE_MARKER`, listing every file with its size. The marker of the previous save is removed just
  before the first file moves and the staging folder just after the new marker is written, so a kill at any moment
  leaves either the previous complete save (marker valid, staging folder ignored) or the new one, or — during the
  few renames — a folder with a staging folder and no marker, which :func:`check_save_complete` refuses to load.
- **Checkpoints** (``checkpoint-N``) get the same marker once every file of the checkpoint is on disk (every
  process, after a barrier). A ``checkpoint-N`` without it is incomplete: resuming skips it (``True``) or refuses
  it (a path), and the trainer sets it aside (renamed ``checkpoint-N.incomplete``) so that checkpoint rotation and
  ``get_last_checkpoint`` never pick it.

Written by hand because transformers' Trainer writes every save in place (its one attempt at staging checkpoints,
``tmp-checkpoint-N`` in 4.36, was reverted), and PEFT's ``save_pretrained`` too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable

from .errors import MoEUnlearnError

logger = logging.getLogger(__name__)

#: The file that says a save (final or checkpoint) is complete: ``{"files": {relative path: size in bytes}}``.
SAVE_MARKER = "save_complete.json"
#: Staging folder of a final save, inside the target folder (hidden, and not a ``checkpoint-N`` name).
STAGING_DIR = ".incomplete-save"
#: What an incomplete checkpoint is renamed to (``checkpoint-N`` + this), out of transformers' ``checkpoint-\d+``.
INCOMPLETE_SUFFIX = ".incomplete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------------- the marker
#: Not listed in a marker: the model card, which ``create_model_card`` rewrites after the save (documentation, not
#: part of what a loader reads as the model).
UNLISTED = ("README.md",)


def _files_under(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> size), the marker, the model card, checkpoints and staging
    folders left out."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != STAGING_DIR and not _CHECKPOINT.match(d)
                   and not d.endswith(INCOMPLETE_SUFFIX)]
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != SAVE_MARKER and relative not in UNLISTED and not relative.endswith(".tmp"):
                found[relative] = os.path.getsize(path)
    return found


def _write_json_atomically(path: str, value: object) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_marker(folder: str, files: dict[str, int] | None = None) -> None:
    """Mark ``folder`` complete: list ``files`` (default: every file in it now) with their sizes."""
    _write_json_atomically(os.path.join(folder, SAVE_MARKER), {"files": files if files is not None
                                                                else _files_under(folder)})


def read_marker(folder: str) -> dict[str, int] | None:
    """The files the marker of ``folder`` lists, or None when it has no marker."""
    path = os.path.join(folder, SAVE_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        return {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise MoEUnlearnError(f"{path} is unreadable ({err}): the save in {folder} cannot be trusted. Save again, "
                              f"or resume from another checkpoint.") from err


def marker_problem(folder: str) -> str | None:
    """Why ``folder``'s marker does not vouch for it (a listed file missing or of another size), or None."""
    files = read_marker(folder)
    if files is None:
        return f"it has no {SAVE_MARKER}"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name}, listed in its {SAVE_MARKER}, is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, its {SAVE_MARKER} says {size}"
    return None


def check_save_complete(folder: str) -> None:
    """Refuse to load a folder whose last save was interrupted; accept a complete save, or one not made by this
    package (no marker and no staging folder: a plain PEFT/transformers save, or a Hub snapshot)."""
    interrupted = os.path.isdir(os.path.join(folder, STAGING_DIR))
    if read_marker(folder) is None and not interrupted:
        return
    problem = marker_problem(folder)
    if problem is None:
        return
    raise MoEUnlearnError(
        f"The save in {folder} did not finish ({problem}{'; ' + STAGING_DIR + '/ is still there' if interrupted else ''}"
        f"): its files may come from two different saves. Save again (or resume the run from its last complete "
        f"checkpoint), then load."
    )


# ---------------------------------------------------------------------------------------------- final saves
def staging_folder(folder: str) -> str:
    """An empty staging folder inside ``folder`` (a leftover of a killed save is removed first)."""
    staging = os.path.join(folder, STAGING_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish(staging: str, folder: str, kill_point: Callable[[str], None] | None = None) -> None:
    """Move the files written into ``staging`` into ``folder`` and mark the save complete.

    The previous save's files that this one does not write again (listed in its marker) are removed, so the folder
    never mixes two saves once the marker is written. ``kill_point`` (tests only) is called with the name of each
    step, to interrupt the publication where a kill could.
    """
    point = kill_point or (lambda name: None)
    new_files = _files_under(staging)
    old_files = read_marker(folder) or {}
    marker = os.path.join(folder, SAVE_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    point("marker removed")
    for name in sorted(new_files):
        target = os.path.join(folder, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, name), target)
        point(f"moved {name}")
    for name in sorted(set(old_files) - set(new_files)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
    write_marker(folder, new_files)
    point("marker written")
    shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------- checkpoints
def checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``folder``, by step."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))]
    return sorted(found)


def last_complete_checkpoint(folder: str) -> str | None:
    """The latest ``checkpoint-N`` of ``folder`` whose save finished (its marker vouches for it), or None."""
    for step, path in reversed(checkpoints(folder)):
        problem = marker_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping %s: its save did not finish (%s).", path, problem)
    return None


def set_aside_incomplete_checkpoints(folder: str) -> list[str]:
    """Rename every incomplete ``checkpoint-N`` of ``folder`` to ``checkpoint-N.incomplete`` (kept, not deleted),
    so that rotation (``save_total_limit``) and resuming never take it for a checkpoint. Returns the new paths."""
    moved = []
    for _, path in checkpoints(folder):
        problem = marker_problem(path)
        if problem is not None:
            target = path + INCOMPLETE_SUFFIX
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            logger.warning("%s is incomplete (%s): renamed to %s.", path, problem, target)
            moved.append(target)
    return moved


# ------------------------------------------------------------------------------------------ output folders
def previous_run(folder: str) -> list[str]:
    """What in ``folder`` belongs to a run: its ``checkpoint-N`` folders and a final save (marker or
    ``unlearn_config.json``); empty when the folder is new or holds nothing of a run."""
    if not os.path.isdir(folder):
        return []
    found = [os.path.basename(path) for _, path in checkpoints(folder)]
    found += [name for name in (SAVE_MARKER, "unlearn_config.json", "adapter_config.json")
              if os.path.isfile(os.path.join(folder, name))]
    return found


def check_output_dir(folder: str, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another run, unless resuming it or overwriting it."""
    if resuming or overwrite:
        return
    found = previous_run(folder)
    if not found:
        return
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    raise MoEUnlearnError(
        f"The output folder {folder} already holds a run ({shown}). A new run there would mix its checkpoints and "
        f"saves with the old ones. Pass resume_from_checkpoint=True to continue that run, overwrite_output_dir=True "
        f"to replace it, or choose another output folder."
    )


def clear_previous_run(folder: str) -> list[str]:
    """Remove a previous run from ``folder`` (for ``overwrite_output_dir``): its checkpoints (complete or not),
    the files its final save listed, and a leftover staging folder. Other files are left alone."""
    removed = []
    for _, path in checkpoints(folder):
        shutil.rmtree(path)
        removed.append(os.path.basename(path))
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(INCOMPLETE_SUFFIX) and name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                removed.append(name)
    for name in (read_marker(folder) or {}) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    for name in (SAVE_MARKER, STAGING_DIR):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)
    return removed


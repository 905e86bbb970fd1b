"""Checkpoints a run can resume from: what it trains, optimizer, scheduler, RNG states and the next step.

Each is a directory ``OUTPUT/checkpoints/step_NNNNNN`` written under a temporary name and renamed, so a
crash mid-write leaves the previous checkpoint intact; the last ``keep`` are kept.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

STATE = "state.pt"


def save_checkpoint(output_dir: Path, step: int, state: dict, keep: int | None, write_files=None) -> Path:
    """``state``: the trainable's, optimizer's and scheduler's state dicts; ``step``: optimizer steps done (the
    step a resumed run starts at); ``write_files(directory)`` adds readable files (e.g. the vectors); ``keep``:
    prune to the last ``keep`` (None: leave that to ``prune_checkpoints``, as a sweep does once every run has
    written the step's, so a kill in between never leaves the runs without a step in common)."""
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    partial = root / f".step_{step:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    state = {**state, "step": step, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    torch.save(state, partial / STATE)
    if write_files is not None:
        write_files(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    if keep is not None:
        prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir: Path, keep: int, step: int | None = None) -> None:
    """Delete all but the last ``keep`` checkpoints, and first any of a step after ``step`` (the run's current
    one): a sweep's run left a checkpoint ahead of the others by a kill redoes that step, and a stale copy kept
    would be counted as its latest and pruned in place of the one it resumed from."""
    found = sorted(p for p in (output_dir / "checkpoints").glob("step_*") if p.is_dir())
    if step is not None:
        for stale in [p for p in found if checkpoint_step(p) > step]:
            shutil.rmtree(stale)
            found.remove(stale)
    for old in found[:-keep]:
        shutil.rmtree(old)


def common_resume_step(latest: dict[str, int], save_every: int) -> int:
    """The step every run of a sweep resumes from, given each run's latest checkpoint step (0: none): the runs
    step together, so a kill between their checkpoints leaves them at most ``save_every`` steps apart and they
    all go back to the earliest. Runs further apart never trained together (a run added to the sweep, a
    checkpoint folder lost): refused, rather than throw away the others' progress."""
    if max(latest.values()) == 0:
        raise FileNotFoundError(f"--resume: no checkpoint in {', '.join(f'{run}/checkpoints' for run in latest)}")
    behind, ahead = min(latest, key=latest.get), max(latest, key=latest.get)
    if latest[ahead] - latest[behind] > save_every:
        has = f"its latest checkpoint at step {latest[behind]}" if latest[behind] else "no checkpoint"
        raise ValueError(f"--resume: run {behind} has {has} and run {ahead} one at step {latest[ahead]}: a sweep's "
                         f"runs step together and a kill leaves them at most save_every ({save_every}) steps apart, "
                         "so these never trained as one sweep. Resume the sweep they were started with, or train "
                         "new runs as a sweep of their own (another output_dir)")  # fmt: skip
    return latest[behind]


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory ``step_NNNNNN`` holds."""
    return int(path.name.removeprefix("step_"))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(p for p in (output_dir / "checkpoints").glob("step_*") if (p / STATE).is_file())
    return found[-1] if found else None


def checkpoint_at(output_dir: Path, step: int) -> Path:
    path = output_dir / "checkpoints" / f"step_{step:06d}"
    if not (path / STATE).is_file():
        kept = sorted(p.name for p in (output_dir / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"--resume: {output_dir} has no checkpoint of step {step} (it has {kept}); the runs "
                                "of a sweep resume from the latest step all of them kept")  # fmt: skip
    return path


def load_checkpoint(path: Path) -> dict:
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state

"""A forecast the trainer resumes from: the trainer's own state beside the forecast weights.

A Hugging Face Trainer resumes from a checkpoint folder holding the weights, trainer_state.json and,
to keep its optimizer and learning-rate schedule, optimizer.pt and scheduler.pt (both, or it silently
restarts both). farcast copies the last checkpoint's optimizer, scaler, RNG and training-arguments
files as opaque bytes (it never unpickles them), and writes trainer_state.json with global_step and
epoch advanced by the horizon and a log entry marking the jump. The learning-rate schedule is the
user's explicit choice: `keep` copies scheduler.pt as it is (the schedule resumes where the run left
it), `advance` moves a LambdaLR schedule (every schedule transformers' get_scheduler builds) on by
the horizon, reading and writing scheduler.pt only with torch's weights-only loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from farcast_cli.errors import InputError, OutputError, UsageError, named, parameter
from farcast_cli.io.output import copy_file, write_text
from farcast_cli.io.run import TRAINER_STATE, TRAINING_STATE_FILES, Checkpoint, Run, read_json
from farcast_cli.io.writer import output_failure

SCHEDULER = "scheduler.pt"
COPIED_AS_BYTES = tuple(name for name in TRAINING_STATE_FILES if name != SCHEDULER)
SCHEDULES = ("keep", "advance")


@dataclass(frozen=True)
class Resume:
    """What the trainer will do when it resumes from the output; the report carries it."""

    schedule: str
    global_step: int
    epoch: float | None
    copied: list[str]
    missing: list[str]
    next_learning_rate: float | None
    skipped_batches: int
    advice: list[str]


def resumable_folder_name(run: Run, horizon: int) -> str | None:
    """The folder of the run a trainer resumes from `horizon` steps past its last checkpoint."""
    return run.layout.resumable_name(run.last.saved_step + horizon)


def check_resumable(run: Run) -> None:
    """Refuse a resumable output where the trainer could not resume from it, before any work (the
    schedule is checked with the request, requests.py)."""
    if not run.layout.resumable:
        raise UsageError(
            f"{run.path}: {parameter('resumable=True')} writes a Trainer checkpoint folder; this run holds {run.layout.description}"
        )
    if not (run.last.path / TRAINER_STATE).exists():
        raise InputError(f"{run.last.path / TRAINER_STATE}: missing; a trainer resumes only from a checkpoint that has one")


def write_trainer_state(last: Checkpoint, folder: Path, horizon: int, schedule: str, provenance: dict) -> Resume:
    """The trainer's files for `folder`, a forecast `horizon` steps past `last` (module docstring)."""
    copied = [path.name for path in sorted(last.path.iterdir()) if any(fnmatch(path.name, p) for p in COPIED_AS_BYTES)]
    for name in copied:
        copy_file(last.path / name, folder / name)
    missing = [name for name in ("optimizer.pt", SCHEDULER) if not (last.path / name).exists()]
    next_lr = None
    if (last.path / SCHEDULER).exists():
        scheduler = _load_scheduler(last.path / SCHEDULER, required=schedule == "advance")
        next_lr = _last_learning_rate(scheduler)
        if schedule == "advance":
            _save_scheduler(_advanced(scheduler, horizon, last.path / SCHEDULER), folder / SCHEDULER)
        else:
            copy_file(last.path / SCHEDULER, folder / SCHEDULER)
        copied.append(SCHEDULER)
    state = read_json(last.path / TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise InputError(f"{last.path / TRAINER_STATE}: not a trainer state (a JSON object with a log_history list)")
    step = last.saved_step + horizon
    epoch = state.get("epoch")
    if isinstance(epoch, (int, float)) and last.saved_step > 0:
        state["epoch"] = epoch = epoch * step / last.saved_step
    state["global_step"] = step
    state.setdefault("log_history", []).append({"step": step, "farcast": {**provenance, "horizon": horizon, "schedule": schedule}})
    write_text(folder / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
    return Resume(schedule, step, epoch, copied, missing, next_lr, horizon, _advice(last, horizon, schedule, missing, next_lr))


def check_still_newest(run: Run, last: Checkpoint) -> None:
    """Publish only while `last` is still the run's newest checkpoint: a checkpoint folder past it that was
    not there (as a forecast, or skipped as incomplete) when the run was read means training went on meanwhile."""
    known = {checkpoint.path for checkpoint in run.forecasts} | {Path(skipped["path"]) for skipped in run.skipped}
    for folder in sorted(run.path.iterdir()):
        step = run.layout.step_of(folder.name)
        if step is not None and step > last.saved_step and folder not in known:
            raise OutputError(
                f"{folder}: appeared while farcast was working (the run went on past {last.path.name}); nothing published: run it again"
            )


def _advice(last: Checkpoint, horizon: int, schedule: str, missing: list[str], next_lr: float | None) -> list[str]:
    step = last.saved_step + horizon
    lines = [
        f"the trainer resumes at global step {step}: it skips {horizon} more batches of its data order than resuming from step "
        f"{last.saved_step} would (TrainingArguments(ignore_data_skip=True) skips none and starts the current epoch's data afresh)",
    ]
    rate = "unknown" if next_lr is None else f"{next_lr:.6g}"
    if schedule == "keep":
        lines.append(
            f"{parameter('schedule')} keep: the learning-rate schedule resumes where the run left it at step {last.saved_step}; "
            f"next rate {rate}"
        )
    else:
        lines.append(
            f"{parameter('schedule')} advance: the schedule is moved on {horizon} steps, to step {step}; "
            "the first resumed step still uses the "
            f"stored rate {rate}, then the schedule's rate at step {step + 1}"
        )
    if missing:
        lines.append(f"{' and '.join(missing)} missing in {last.path.name}: a Trainer then restarts both the optimizer and the schedule")
    return [named(line) for line in lines]


def _load_scheduler(path: Path, required: bool) -> dict | None:
    """scheduler.pt through torch's weights-only loader, which refuses anything but plain data."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if not required:
            return None
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: torch's weights-only loader refuses it ({reason}); use {parameter('schedule')} keep") from None
    return state if isinstance(state, dict) else None


def _last_learning_rate(state: dict | None) -> float | None:
    rates = (state or {}).get("_last_lr")
    return float(rates[0]) if isinstance(rates, list) and rates and isinstance(rates[0], (int, float)) else None


def _advanced(state: dict | None, horizon: int, path: Path) -> dict:
    """A LambdaLR state moved on by `horizon` steps: its rate is base_lr x lambda(last_epoch), so moving
    the counter moves the schedule; other schedulers compute each rate from the last and cannot be moved so."""
    if not isinstance(state, dict) or not {"lr_lambdas", "last_epoch", "base_lrs"} <= state.keys():
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise InputError(
            f"{path}: {parameter('schedule')} advance moves LambdaLR schedules (what transformers' get_scheduler builds); "
            f"this one holds {found}; use {parameter('schedule')} keep"
        )
    advanced = dict(state)
    advanced["last_epoch"] = state["last_epoch"] + horizon
    if isinstance(state.get("_step_count"), int):
        advanced["_step_count"] = state["_step_count"] + horizon
    return advanced


def _save_scheduler(state: dict, path: Path) -> None:
    import torch

    try:
        torch.save(state, path)
    except OSError as error:
        raise output_failure(path, error) from None

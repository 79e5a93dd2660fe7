"""Find a training run's checkpoints on disk and check that they describe the same model.

A run's time axis is its training steps. Two things farcast itself leaves in a run are read here:
checkpoints farcast wrote (the `farcast` entry in their safetensors metadata), which are forecasts
and never history; and jumps made by farcast inside a training loop (integrations/), after which the
weights saved at global step s stand for step s + the horizons jumped before s. Jumps are recorded in
each later checkpoint's trainer_state.json (log_history entries {"step": s, "farcast_jump": H}) and
in the run folder's farcast_jumps.json.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from farcast_cli.errors import DamagedCheckpoint, IncompleteCheckpoint, InputError, OutputError, named, parameter
from farcast_cli.io import dcp
from farcast_cli.io.reader import SafetensorsFile, TensorInfo

SHARD_NAME = re.compile(r"-\d+-of-\d+$")
LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE = "trainer_state.json"
JUMPS_FILE = "farcast_jumps.json"
PROVENANCE_KEY = "farcast"
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "chat_template.*",
)


@dataclass(frozen=True)
class Jump:
    """A jump farcast made inside a training loop: after saving global step `at_step`, the weights were
    replaced by a forecast `horizon` steps ahead."""

    at_step: int
    horizon: int


@dataclass
class Checkpoint:
    """One saved step: one safetensors file, or several shards with an index. `step` is the step on the
    run's time axis; `saved_step` the number it was saved under (they differ after in-loop jumps)."""

    step: int
    path: Path
    files: dict[str, SafetensorsFile]
    shard_of: dict[str, str]
    index_name: str | None = None
    aux_files: list[Path] = field(default_factory=list)
    saved_step: int | None = None
    jumps: tuple[Jump, ...] | None = None
    dcp: dcp.DcpFolder | None = None

    def __post_init__(self) -> None:
        if self.saved_step is None:
            self.saved_step = self.step

    @property
    def is_forecast(self) -> bool:
        """Written by farcast: its safetensors metadata names it so."""
        return any(PROVENANCE_KEY in file.metadata for file in self.files.values())

    def tensor(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        file = self.files[self.shard_of[name]]
        return file, file.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(file.size for file in self.files.values())

    def check_unchanged(self) -> None:
        if self.dcp is not None:
            self.dcp.check_unchanged()
            return
        for file in self.files.values():
            file.check_unchanged()


Found = tuple[int, Path, Callable[[Path], Checkpoint]]
"""A checkpoint a layout found: its step, its place, and how to read it."""


class Layout:
    """One way a run keeps its checkpoints on disk, and everything that depends on it: how its
    checkpoints are found (`find`), which names in a run folder are its checkpoints (`claims`, so that
    no output is mistaken for one), where an evaluator is pointed at a checkpoint folder farcast wrote
    (`evaluated`: the same kind of path as the run's own checkpoints), and whether a trainer resumes
    from it (`resumable`, and the folder a resumable forecast takes). LAYOUTS lists them in the order
    find_run tries them; adding one is a subclass here and a line there."""

    name: str = ""
    expected: str = ""
    description: str = ""
    resumable: bool = False

    def find(self, folder: Path, entries: list[Path]) -> list[Found]:
        """The run's checkpoints in this layout, from the folder's entries (none: not this layout), each
        as its step, its place and how to read it: find_run reads them, skipping incomplete ones."""
        raise NotImplementedError

    def claims(self, name: str) -> bool:
        raise NotImplementedError

    def evaluated(self, folder: Path) -> Path:
        return folder

    def step_of(self, name: str) -> int | None:
        """The step a checkpoint folder of this name was saved at (None: not a checkpoint folder)."""
        return None

    def resumable_name(self, saved_step: int) -> str | None:
        """The folder a trainer resumes from at `saved_step` (None where it cannot resume)."""
        return None

    def settled(self, checkpoints: list[Checkpoint]) -> Layout:
        """The run's layout once its checkpoints are read (a Trainer folder may hold a distributed checkpoint)."""
        return self

    def __str__(self) -> str:
        return self.name


class TrainerFolders(Layout):
    """Hugging Face Trainer checkpoints: checkpoint-<step>/ folders, each with model.safetensors or
    shards and their index, the config and tokenizer files, and the trainer's state. farcast's own
    outputs are folders like these, emitted steps as checkpoint-<step>/ folders inside the output."""

    name, expected, description, resumable = "trainer", "checkpoint-<step>/ folders", "Trainer checkpoint folders", True
    FOLDER = re.compile(r"^checkpoint-(\d+)$")

    def find(self, folder: Path, entries: list[Path]) -> list[Found]:
        steps = {p: self.step_of(p.name) for p in entries if p.is_dir()}
        return [(step, p, lambda place, step=step: folder_checkpoint(place, step)) for p, step in steps.items() if step is not None]

    def claims(self, name: str) -> bool:
        return name.startswith("checkpoint-")

    def step_of(self, name: str) -> int | None:
        match = self.FOLDER.match(name)
        return None if match is None else int(match.group(1))

    def folder_name(self, step: int) -> str:
        return f"checkpoint-{step}"

    def settled(self, checkpoints: list[Checkpoint]) -> Layout:
        return DCP if any(c.dcp for c in checkpoints) else self

    def resumable_name(self, saved_step: int) -> str | None:
        return self.folder_name(saved_step)


class StepFiles(Layout):
    """Plain step-numbered files: <name><step>.safetensors, one file per checkpoint. An evaluator is
    pointed at the model.safetensors of a folder farcast wrote, as it is at the run's own files."""

    name, expected, description = "files", "<name><step>.safetensors files", "plain safetensors files"

    def find(self, folder: Path, entries: list[Path]) -> list[Found]:
        return _step_files(entries)

    def claims(self, name: str) -> bool:
        return Path(name).suffix == ".safetensors"

    def evaluated(self, folder: Path) -> Path:
        return folder / SINGLE_FILE


class DcpFolders(Layout):
    """PyTorch distributed checkpoints (io/dcp.py): <name>-<step>/ folders holding a .metadata, or Trainer
    checkpoint-<step>/ folders that hold one (an FSDP Trainer's pytorch_model_fsdp_0/). Forecasts are
    written as distributed checkpoints like the input's."""

    name, expected, description = "dcp", "<name>-<step>/ folders of a distributed checkpoint", "distributed checkpoints (DCP)"

    def find(self, folder: Path, entries: list[Path]) -> list[Found]:
        numbered = [p for p in entries if p.is_dir() and dcp.NUMBERED_FOLDER.match(p.name) and dcp.looks_like_dcp(p)]
        return [(int(dcp.NUMBERED_FOLDER.match(p.name).group(2)), p, _numbered_dcp_checkpoint) for p in numbered]

    def claims(self, name: str) -> bool:
        return dcp.NUMBERED_FOLDER.match(name) is not None


TRAINER, DCP = TrainerFolders(), DcpFolders()
LAYOUTS: list[Layout] = [TRAINER, DCP, StepFiles()]


@dataclass
class Run:
    path: Path
    layout: Layout
    checkpoints: list[Checkpoint]
    warnings: list[str] = field(default_factory=list)
    forecasts: list[Checkpoint] = field(default_factory=list)
    jumps: tuple[Jump, ...] = ()
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]

    def tensor_infos(self) -> list[TensorInfo]:
        """The last checkpoint's tensors, in file order within each shard."""
        return [info for file in self.last.files.values() for info in sorted(file.tensors.values(), key=lambda t: t.begin)]

    def at_step(self, step: int) -> Checkpoint:
        for checkpoint in self.checkpoints:
            if checkpoint.step == step:
                return checkpoint
        raise InputError(f"{self.path}: no checkpoint at step {step} (found {describe_steps(self.steps)})")

    def truncated(self, last_index: int) -> Run:
        return Run(self.path, self.layout, self.checkpoints[: last_index + 1], self.warnings, self.forecasts, self.jumps, self.skipped)


RESUMABLE = parameter("resumable=True")
TRAINING_STATE_REASON = f"the trainer's pickled state, which farcast never loads (copied as bytes only into a {RESUMABLE} output)"
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin")
LEFT_OUT = {
    **dict.fromkeys(TRAINING_STATE_FILES, TRAINING_STATE_REASON),
    TRAINER_STATE: f"the trainer's state at the last step, not the forecast's (written anew, advanced, into a {RESUMABLE} output)",
}


def output_files(checkpoint: Checkpoint) -> tuple[list[str], list[tuple[str, str]]]:
    """The files beside the weights that an output copies (config, tokenizer), and those it leaves out, with why."""
    if checkpoint.path.is_file():
        return [], []
    weights = set(checkpoint.files) | ({checkpoint.index_name} if checkpoint.index_name else set())
    if checkpoint.dcp is not None:
        weights |= {path.name for path in checkpoint.dcp.files} | {dcp.METADATA_FILE, dcp.PROVENANCE_FILE}
    copied = sorted(path.name for path in checkpoint.aux_files)
    left_out = []
    for path in sorted(checkpoint.path.iterdir()):
        if path.name in weights or path.name in copied or path.is_dir():
            continue
        reason = next(
            (why for pattern, why in LEFT_OUT.items() if fnmatch(path.name, pattern)), "not a model or tokenizer file farcast knows"
        )
        left_out.append((path.name, named(reason)))
    return copied, left_out


def describe_steps(steps: list[int]) -> str:
    """'20 checkpoints, steps 30..600 every 30', or with the smallest and largest spacing when it varies."""
    gaps = sorted({b - a for a, b in zip(steps, steps[1:])})
    every = f" every {gaps[0]}" if len(gaps) == 1 else f", {gaps[0]} to {gaps[-1]} apart"
    return f"{len(steps)} checkpoints, steps {steps[0]}..{steps[-1]}" + (every if gaps else "")


def find_run(path: Path, last_step: int | None = None, skip_damaged: bool = False) -> Run:
    """Discover a run in the Trainer layout or as step-numbered safetensors files.

    Checkpoints saved after `last_step` are not read at all. The newest checkpoints that are incomplete
    (a file or shard missing or cut short: still being written when a job stopped) are skipped, each
    named in `run.skipped`; a checkpoint that cannot be read anywhere else may be lost data and stops
    the run (DamagedCheckpoint) unless `skip_damaged`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such folder")
    if not path.is_dir():
        raise InputError(f"{path}: is a file; give the folder that holds the run's checkpoints")
    if dcp.holds_dcp(path):
        raise InputError(
            f"{path}: is one distributed checkpoint; give the folder that holds the run's checkpoint-<step>/ or <name>-<step>/ folders"
        )
    _reject_partial_weights(path)
    warnings = [f"{p}: skipped, a checkpoint still being written" for p in sorted(path.glob("tmp-*"))]
    layout, found = _first_layout_found(path)
    found = [(step, place, read) for step, place, read in found if last_step is None or step <= last_step]
    skipped: list[dict[str, str]] = []
    checkpoints = _readable(found, skip_damaged, skipped)
    run = Run(path, layout.settled(checkpoints), checkpoints, warnings, skipped=skipped)
    run.warnings += [f"{s['path']}: skipped, {s['why']}" for s in skipped]
    run.forecasts = [c for c in run.checkpoints if c.is_forecast]
    run.checkpoints = [c for c in run.checkpoints if not c.is_forecast]
    _set_time_axis(run)
    run.warnings += [f"{c.path}: a forecast farcast wrote; not used as history" for c in run.forecasts]
    if not run.checkpoints:
        raise InputError(f"{path}: no checkpoints found (expected {', '.join(layout.expected for layout in LAYOUTS)})")
    run.warnings += [f"{c.path / name}: stray shard, not named by the index; ignored" for c in run.checkpoints for name in stray_shards(c)]
    if len(run.checkpoints) < 2:
        raise InputError(f"{path}: only one checkpoint ({run.checkpoints[0].path.name}); farcast needs at least two")
    _check_same_model(run)
    return run


def _first_layout_found(path: Path) -> tuple[Layout, list[Found]]:
    """The first layout that finds checkpoints in the run folder, and what it found (the last layout and
    nothing if none does)."""
    entries = _list(path)
    for layout in LAYOUTS:
        found = layout.find(path, entries)
        if found:
            return layout, found
    return LAYOUTS[-1], []


def _dcp_checkpoint(folder: Path, dcp_path: Path, step: int) -> Checkpoint:
    """A checkpoint saved by torch.distributed.checkpoint (io/dcp.py): one virtual file per tensor."""
    found = dcp.read_dcp_folder(dcp_path)
    return Checkpoint(step, folder, dict(found.tensors), {name: name for name in found.tensors}, dcp=found)


def _numbered_dcp_checkpoint(folder: Path) -> Checkpoint:
    """A `<name>-<step>/` folder of a distributed checkpoint; without its .metadata (torch writes it last) it is incomplete."""
    if not dcp.holds_dcp(folder):
        raise IncompleteCheckpoint(f"{folder}: no {dcp.METADATA_FILE}; the distributed checkpoint is incomplete (still being saved?)")
    return _dcp_checkpoint(folder, folder, int(dcp.NUMBERED_FOLDER.match(folder.name).group(2)))


def _readable(found: list[Found], skip_damaged: bool, skipped: list[dict]) -> list[Checkpoint]:
    """The checkpoints that can be read, by step. Those after the newest readable one that are incomplete
    are left out, and so are all others that cannot be read with `skip_damaged` (without, the first one
    stops the run), each added to `skipped` with why."""
    results: list[tuple[Path, Checkpoint | InputError]] = []
    for _, place, read in sorted(found, key=lambda item: item[0]):
        try:
            results.append((place, read(place)))
        except InputError as error:
            results.append((place, error))
    newest = max((i for i, (_, got) in enumerate(results) if isinstance(got, Checkpoint)), default=None)
    if newest is None and results:
        raise results[0][1]
    for i, (place, got) in enumerate(results):
        if isinstance(got, Checkpoint):
            continue
        if i > newest and isinstance(got, IncompleteCheckpoint):
            why = "incomplete, the newest checkpoints (still being written when the job stopped?)"
        elif i > newest:
            why = "unreadable, after the newest complete checkpoint"
        else:
            why = "unreadable, between complete checkpoints"
        if why.startswith("unreadable") and not skip_damaged:
            raise DamagedCheckpoint(f"{got}; {place.name} lies {why.removeprefix('unreadable, ')}")
        skipped.append({"path": str(place), "why": f"{why}: {got}"})
    return [got for _, got in results if isinstance(got, Checkpoint)]


def _list(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None


def _reject_partial_weights(folder: Path) -> None:
    """Folders that hold something other than full weights get an error that says what to do."""
    names = {p.name for p in _list(folder)}
    if "adapter_model.safetensors" in names and SINGLE_FILE not in names and INDEX_FILE not in names:
        raise InputError(
            f"{folder}: holds a PEFT adapter only (adapter_model.safetensors); "
            "merge it into the base model first (peft's merge_and_unload) and save full weights"
        )
    if any(n.startswith("global_step") for n in names) or "zero_to_fp32.py" in names:
        raise InputError(
            f"{folder}: holds DeepSpeed ZeRO shards (global_step*/); "
            "convert them with the zero_to_fp32.py script DeepSpeed saved beside them, then save as safetensors"
        )
    if any(n.endswith(".distcp") for n in names) and dcp.METADATA_FILE not in names:
        raise IncompleteCheckpoint(
            f"{folder}: holds an FSDP sharded state (*.distcp); "
            f"its {dcp.METADATA_FILE} is missing, so it is incomplete or not written by torch.distributed.checkpoint"
        )


def folder_checkpoint(folder: Path, step: int) -> Checkpoint:
    """A checkpoint folder at `step`: model.safetensors or shards with their index, the config and
    tokenizer files beside them, and the trainer's state if there is one."""
    _reject_partial_weights(folder)
    names = {p.name for p in _list(folder)}
    dcp_path = dcp.dcp_folder_of(folder) if SINGLE_FILE not in names and INDEX_FILE not in names else None
    if dcp_path is not None:
        checkpoint = _dcp_checkpoint(folder, dcp_path, step)
    elif INDEX_FILE in names:
        checkpoint = _sharded_checkpoint(folder, step)
    elif SINGLE_FILE in names:
        file = SafetensorsFile(folder / SINGLE_FILE)
        checkpoint = Checkpoint(step, folder, {SINGLE_FILE: file}, {name: SINGLE_FILE for name in file.tensors})
    elif "pytorch_model.bin" in names or "model.pt" in names:
        raise InputError(
            f"{folder}: holds pickled weights only; farcast never loads pickles: save with safetensors (save_safetensors=True)"
        )
    else:
        raise IncompleteCheckpoint(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}")
    checkpoint.aux_files = [folder / n for n in sorted(names) if any(fnmatch(n, pattern) for pattern in AUX_PATTERNS)]
    checkpoint.jumps = _check_trainer_state(folder, step)
    return checkpoint


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: not valid JSON ({str(error).splitlines()[0][:100]})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None


def _check_trainer_state(folder: Path, step: int) -> tuple[Jump, ...] | None:
    """Check the trainer's step against the folder's; return the farcast jumps its log records (None
    without a trainer_state.json)."""
    state_path = folder / TRAINER_STATE
    if not state_path.exists():
        return None
    state = read_json(state_path)
    recorded = state.get("global_step") if isinstance(state, dict) else None
    if recorded is not None and recorded != step:
        raise InputError(f"{state_path}: global_step is {recorded} but the folder name says step {step}")
    log = state.get("log_history") if isinstance(state, dict) else None
    entries = [e for e in log if isinstance(e, dict) and "farcast_jump" in e] if isinstance(log, list) else []
    try:
        return tuple(Jump(int(e["step"]), int(e["farcast_jump"])) for e in entries)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{state_path}: a farcast_jump entry of log_history needs an integer step and farcast_jump") from None


def read_jumps(run_dir: Path) -> tuple[Jump, ...]:
    """The jumps recorded in the run folder's farcast_jumps.json (none without one)."""
    path = Path(run_dir) / JUMPS_FILE
    if not path.exists():
        return ()
    data = read_json(path)
    try:
        return tuple(Jump(int(j["at_step"]), int(j["horizon"])) for j in data["jumps"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f'{path}: expected {{"jumps": [{{"at_step": S, "horizon": H}}, ...]}}') from None


def record_jump(run_dir: Path, jump: Jump) -> None:
    """Add a jump to the run folder's farcast_jumps.json, replacing the file whole."""
    JumpRecord(run_dir).add(jump)


class JumpRecord:
    """The run folder's farcast_jumps.json for a writer that adds to it, jump by jump: the file is read
    at the first jump added and its jumps kept, so that each later one only writes (reading it back and
    json's indented encoder, which is pure Python, were 0.14 ms of the 0.35 ms a record took on a quiet
    disk, where a jump on the digits MLP has a 2.6 ms budget). Each write replaces the file whole,
    through a temporary file, as `json.dumps(..., indent=1)` writes it.

    With `background`, the text is formatted on the caller's thread and the file written on a thread of
    its own (the training loop's: the write and rename are file-system latency, 0.5-0.6 ms a jump in
    the loop, benchmarks/RESULTS.md "A jump's own cost, sixth session"), one write outstanding at most:
    `add` and `flush` wait for the one before, and raise its error naming the file. So the file may lag
    the last `add` by one write until the next `add`, `flush` or `close`, or the interpreter's exit."""

    def __init__(self, run_dir: Path, background: bool = False) -> None:
        self.run_dir, self.path = run_dir, Path(run_dir) / JUMPS_FILE
        self.jumps: list[Jump] | None = None
        self._writer = _BackgroundWriter() if background else None
        if self._writer is not None:
            weakref.finalize(self, self._writer.close)

    def add(self, jump: Jump) -> None:
        self.flush()
        if self.jumps is None:
            self.jumps = list(read_jumps(self.run_dir))
        text = jumps_text([*self.jumps, jump]).encode()
        self.jumps.append(jump)
        if self._writer is None:
            _replace(self.path, text)
        else:
            self._writer.write(self.path, text)

    def flush(self) -> None:
        """Wait for the write outstanding, if any; raise its error, naming the file."""
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> None:
        """`flush`, and end the writing thread (a later `add` starts another)."""
        if self._writer is not None:
            self._writer.close()


class _BackgroundWriter:
    """One thread that replaces files whole, one write outstanding at most. It holds no reference to the
    record it writes for, so that the record's finalizer (at garbage collection or at the interpreter's
    exit) can wait for the last write and report its error."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.pending: tuple[Path, Future] | None = None

    def write(self, path: Path, data: bytes) -> None:
        self.wait()
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farcast-record")
        self.pending = path, self.executor.submit(_replace, path, data)

    def wait(self) -> None:
        if self.pending is None:
            return
        (path, future), self.pending = self.pending, None
        error = future.exception()
        if isinstance(error, OSError):
            raise OutputError(f"{path}: cannot write the jump record: {error.strerror or error}") from error
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True)
                self.executor = None


def _replace(path: Path, data: bytes) -> None:
    """Replace `path` whole with `data`, through a temporary file beside it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def jumps_text(jumps: list[Jump]) -> str:
    """farcast_jumps.json's text: `json.dumps({"jumps": [{"at_step": S, "horizon": H}, ...]}, indent=1)` and a
    newline, formatted directly (json's encoder with an indent is pure Python)."""
    entries = ",\n".join(f'  {{\n   "at_step": {j.at_step},\n   "horizon": {j.horizon}\n  }}' for j in jumps)
    return f'{{\n "jumps": [\n{entries}\n ]\n}}\n' if jumps else '{\n "jumps": []\n}\n'


def _set_time_axis(run: Run) -> None:
    """Steps on the run's time axis for its real checkpoints (not farcast's forecasts): the saved step
    plus every horizon jumped before it, by the checkpoint's own trainer state where it has one, else by
    the run's farcast_jumps.json."""
    run.jumps = read_jumps(run.path)
    for checkpoint in run.checkpoints:
        jumps = run.jumps if checkpoint.jumps is None else checkpoint.jumps
        checkpoint.step = checkpoint.saved_step + sum(j.horizon for j in jumps if j.at_step < checkpoint.saved_step)
    run.checkpoints.sort(key=lambda c: c.step)
    for earlier, later in zip(run.checkpoints, run.checkpoints[1:]):
        if earlier.step == later.step:
            raise InputError(
                f"{later.path}: stands for step {later.step}, as {earlier.path.name} does, after farcast's jumps; "
                "is it left over from an earlier attempt of this run?"
            )


def _sharded_checkpoint(folder: Path, step: int) -> Checkpoint:
    index_path = folder / INDEX_FILE
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: no weight_map of tensor names to shard files")
    files = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard.startswith("."):
            raise InputError(f"{index_path}: shard name {shard!r} points outside the checkpoint folder")
        if not (folder / shard).is_file():
            raise IncompleteCheckpoint(f"{index_path}: names shard {shard} which does not exist")
        files[shard] = SafetensorsFile(folder / shard)
    holder: dict[str, str] = {}
    for shard, file in files.items():
        for name in file.tensors:
            if name in holder:
                raise InputError(f"{folder}: tensor {name!r} is in two shards, {holder[name]} and {shard}")
            holder[name] = shard
    for name, shard in weight_map.items():
        if holder.get(name) != shard:
            raise InputError(f"{index_path}: maps tensor {name!r} to {shard}, which does not hold it")
    for name, shard in holder.items():
        if name not in weight_map:
            raise InputError(f"{folder / shard}: holds tensor {name!r} that {INDEX_FILE} does not list")
    checkpoint = Checkpoint(step, folder, files, holder, index_name=INDEX_FILE)
    return checkpoint


def stray_shards(checkpoint: Checkpoint) -> list[str]:
    """Shard-like files in a sharded checkpoint's folder that its index does not name."""
    if checkpoint.index_name is None:
        return []
    return [p.name for p in _list(checkpoint.path) if p.suffix == ".safetensors" and p.name not in checkpoint.files]


def _step_files(entries: list[Path]) -> list[Found]:
    """The run's step-numbered safetensors files, each with its step and how to read it."""
    by_step: dict[int, Path] = {}
    for path in entries:
        if path.suffix != ".safetensors" or not path.is_file():
            continue
        if SHARD_NAME.search(path.stem):
            raise InputError(
                f"{path}: looks like one shard of a sharded checkpoint; put each checkpoint in a {TRAINER.expected[:-1]} with its index"
            )
        match = LAST_NUMBER.search(path.stem)
        if match is None:
            continue
        step = int(match.group(1))
        if step in by_step:
            raise InputError(f"{path}: step {step} also given by {by_step[step].name}")
        by_step[step] = path
    return [(step, path, lambda p, step=step: _file_checkpoint(p, step)) for step, path in sorted(by_step.items())]


def _file_checkpoint(path: Path, step: int) -> Checkpoint:
    file = SafetensorsFile(path)
    return Checkpoint(step, path, {path.name: file}, {name: path.name for name in file.tensors})


def _check_same_model(run: Run) -> None:
    reference = {name: (info.dtype, info.shape) for name, info in ((n, run.last.tensor(n)[1]) for n in run.last.shard_of)}
    for checkpoint in run.checkpoints[:-1]:
        if (checkpoint.dcp is None) != (run.last.dcp is None):
            kinds = ("a distributed checkpoint", "safetensors") if checkpoint.dcp else ("safetensors", "a distributed checkpoint")
            raise InputError(
                f"{checkpoint.path}: is {kinds[0]} but the last checkpoint {run.last.path.name} is {kinds[1]}; "
                "farcast reads one format per run"
            )
        names = set(checkpoint.shard_of)
        for name in sorted(names - reference.keys()):
            raise InputError(f"{checkpoint.path}: tensor {name!r} is not in the last checkpoint {run.last.path.name}")
        for name in sorted(reference.keys() - names):
            raise InputError(f"{checkpoint.path}: tensor {name!r} of the last checkpoint {run.last.path.name} is missing")
        for name in sorted(names):
            info = checkpoint.tensor(name)[1]
            dtype, shape = reference[name]
            if info.dtype != dtype:
                raise InputError(f"{checkpoint.path}: tensor {name!r} is {info.dtype} but {dtype} in {run.last.path.name}")
            if info.shape != shape:
                raise InputError(
                    f"{checkpoint.path}: tensor {name!r} has shape {list(info.shape)} but {list(shape)} in {run.last.path.name}"
                )
        if checkpoint.dcp is not None and run.last.dcp is not None:
            dcp.check_same_chunks(run.last.dcp.tensors, checkpoint.dcp.tensors, checkpoint.path, run.last.path)

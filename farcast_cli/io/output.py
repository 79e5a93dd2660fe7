"""Write a checkpoint folder atomically: build it under a temporary name, rename when complete."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from farcast_cli.distributed import ONE_PROCESS, World
from farcast_cli.errors import OutputError, publishing
from farcast_cli.io.run import Checkpoint, Run
from farcast_cli.io.writer import output_failure

T = TypeVar("T")
RUN_SCRATCH = ".farcast"  # the one folder inside a run that outputs may go into: the training-loop integration's scratch


def check_output_location(out_dir: Path, run: Run, force: bool, resumable_name: str | None = None) -> None:
    """Refuse an output inside the run's folder, where it would mix with the run or hide inside its
    checkpoints, or one that would swallow the run. Inside the run, only a resumable forecast may go, named
    `resumable_name` (checkpoint-<its step>), as the trainer expects (an earlier forecast of farcast's
    there is replaced only with --force), and the training-loop integration's scratch (RUN_SCRATCH)."""
    out = out_dir.resolve()
    run_root = run.path.resolve()
    for checkpoint in run.checkpoints:
        place = checkpoint.path.resolve()
        if out == place or place in out.parents:
            raise OutputError(f"{out_dir}: is inside checkpoint {checkpoint.path}; choose an output outside the run's checkpoints")
        if out in place.parents:
            raise OutputError(f"{out_dir}: contains the input checkpoint {checkpoint.path}; refusing to write over the run")
    hint = f" (a resumable forecast goes in {run_root / resumable_name})" if resumable_name else ""
    if out.parent == run_root and (out.name.startswith("checkpoint-") or out.suffix == ".safetensors") and out.name != resumable_name:
        raise OutputError(f"{out_dir}: would look like a checkpoint of the run itself{hint or '; choose another name'}")
    resumable_place = out.parent == run_root and out.name == resumable_name
    if run_root in out.parents and not resumable_place and run_root / RUN_SCRATCH not in out.parents:
        raise OutputError(f"{out_dir}: lies inside the run folder {run.path}; choose an output outside it{hint}")
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir}: already exists; choose a new folder or pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")


def check_file_location(out_file: Path, run: Run) -> None:
    """A forecaster file goes anywhere but into a checkpoint of the run."""
    out = out_file.resolve()
    for checkpoint in run.checkpoints + run.forecasts:
        place = checkpoint.path.resolve()
        if out == place or place in out.parents:
            raise OutputError(f"{out_file}: is inside checkpoint {checkpoint.path}; write the forecaster outside the run's checkpoints")


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces out_dir, on any failure it is removed."""
    created = _make_parents(out_dir.parent)
    temporary = out_dir.parent / f".{out_dir.name}.farcast-tmp-{uuid.uuid4().hex[:8]}"
    try:
        temporary.mkdir()
    except OSError as error:
        _remove_created(created)
        raise output_failure(out_dir, error) from None
    try:
        yield temporary
        with publishing(out_dir):
            _replace(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        _remove_created(created)
        raise


def build_folder(out_dir: Path, write: Callable[[Path], None], finish: Callable[[Path], T], world: World = ONE_PROCESS) -> T:
    """Build out_dir atomically: write(folder) on every rank, then finish(folder) on rank 0, then one
    rename. Rank 0 makes the temporary folder and tells the others its name. Once the
    all-ranks-succeeded check has passed, the folder is rank 0's alone, to finish and rename or to
    remove; until then a rank that fails in any way (lost contact: rank 0 may be dead; a signal)
    removes it too, so that a killed rank 0 leaves nothing either."""
    if world.size == 1:
        with atomic_folder(out_dir) as folder:
            write(folder)
            return finish(folder)
    with ExitStack() as main_stack:
        folder = world.on_main(lambda: main_stack.enter_context(atomic_folder(out_dir)))
        removes = [not world.is_main]
        try:
            world.together(lambda: write(_shared(folder)), passed=removes.clear)
        except BaseException:
            if removes:
                shutil.rmtree(folder, ignore_errors=True)
            raise

        def finish_and_rename() -> T:
            result = finish(folder)
            main_stack.close()
            return result

        return world.on_main(finish_and_rename, patient=True)


def _shared(folder: Path) -> Path:
    """The temporary folder rank 0 made, which every rank must see."""
    if not folder.is_dir():
        raise OutputError(f"{folder}: rank 0's temporary output folder is not visible here; write to a file system every node shares")
    return folder


def _make_parents(parent: Path) -> list[Path]:
    missing = [p for p in [parent, *parent.parents] if not p.exists()][::-1]
    for folder in missing:
        try:
            folder.mkdir()
        except OSError as error:
            _remove_created(missing[: missing.index(folder)])
            raise output_failure(folder, error) from None
    return missing


def _remove_created(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with suppress(OSError):
            folder.rmdir()


def _replace(temporary: Path, out_dir: Path) -> None:
    """Swap the finished folder in. An old one is exchanged with it in one step where the system can
    (Linux, most local file systems), so that OUT never goes missing; elsewhere it moves aside first
    and goes only after the swap."""
    present = out_dir.exists() or out_dir.is_symlink()
    if present and _exchange(temporary, out_dir):
        _remove(temporary)
        return
    old = None
    if present:
        old = out_dir.parent / f".{out_dir.name}.farcast-old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    try:
        temporary.rename(out_dir)
    except OSError as error:
        if old is not None:
            old.rename(out_dir)
        raise output_failure(out_dir, error) from None
    if old is not None:
        _remove(old)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system, the file
    system or the moment cannot (the caller then moves the old one aside)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0


def _remove(path: Path) -> None:
    """Remove what an output replaced: a folder with its contents, or a file or link itself."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


def write_index(folder: Path, source: Checkpoint, sizes: dict[str, int]) -> None:
    """The shard index, mapping each tensor to the shard file of the same name as in the source."""
    if source.index_name is None:
        return
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(source.shard_of.items()))}
    write_text(folder / source.index_name, json.dumps(index, indent=2) + "\n")


def copy_aux_files(folder: Path, source: Checkpoint, link: bool = False) -> None:
    """Config and tokenizer files travel with the weights; optimizer, scheduler and RNG state never do."""
    for path in source.aux_files:
        (link_or_copy if link else copy_file)(path, folder / path.name)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        copy_file(source, target)


def copy_file(source: Path, target: Path) -> None:
    """A byte-for-byte copy; a failure is the output's, named by the target."""
    try:
        shutil.copyfile(source, target)
    except OSError as error:
        raise output_failure(target, error) from None


def write_text(path: Path, text: str) -> None:
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise output_failure(path, error) from None

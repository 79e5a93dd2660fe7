"""Real distributed checkpoints (DCP) for the tests, saved by torch.distributed.checkpoint.save: from
one process, or from two (gloo on CPU) where tensors are DTensors split across the ranks.

Layouts: "fsdp" is the Trainer/accelerate FSDP one (checkpoint-N/pytorch_model_fsdp_0/ holding the
state dict {"model": weights}, the optimizer in checkpoint-N/optimizer_0/, config and trainer state
beside); "titan" is torchtitan's (step-N/ holding the weights at the top level with the optimizer,
scheduler, data loader and training-loop state beside them).
"""

from __future__ import annotations

import io
import json
import os
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

TIED = ("head.weight", "tied_head.weight")
SPLIT_ON_COLUMNS = "encoder.weight"


def model_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixed dtypes (bf16 biases), an int64 buffer and a tied weight (one tensor under two names)."""
    state = {name: value.to(torch.bfloat16) if name.endswith("bias") else value.clone() for name, value in weights.items()}
    state["position_ids"] = torch.arange(12, dtype=torch.int64).reshape(1, 12)
    if TIED[0] in state:
        state[TIED[1]] = state[TIED[0]]
    return state


def _state_dict(weights: dict[str, torch.Tensor], layout: str, step: int, mesh=None) -> dict:
    model = model_state(weights)
    if mesh is not None:
        model = _distributed(model, mesh)
    if layout == "fsdp":
        return {"model": model}
    optimizer = {"state": {name: {"exp_avg": torch.zeros_like(value)} for name, value in model.items() if value.is_floating_point()}}
    return {
        **model,
        "optimizer": optimizer,
        "lr_scheduler": {"last_epoch": step},
        "dataloader": {"position": step * 7},
        "train_state": io.BytesIO(json.dumps({"step": step}).encode()),
    }


def _distributed(model: dict[str, torch.Tensor], mesh) -> dict:
    """Every tensor as a DTensor: split on rows (FSDP's way), one on columns, the rest replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    result = {}
    for name, value in model.items():
        if name == TIED[1]:
            continue
        if name == SPLIT_ON_COLUMNS and value.dim() == 2:
            placement = Shard(1)
        elif value.dim() >= 1 and value.shape[0] % 2 == 0 and value.is_floating_point():
            placement = Shard(0)
        else:
            placement = Replicate()
        result[name] = distribute_tensor(value, mesh, [placement])
    if TIED[0] in result:
        result[TIED[1]] = result[TIED[0]]
    return result


def folder_for(root: Path, layout: str, step: int) -> tuple[Path, Path]:
    """(the checkpoint folder, the DCP folder inside it)."""
    if layout == "fsdp":
        folder = root / f"checkpoint-{step}"
        return folder, folder / "pytorch_model_fsdp_0"
    folder = root / f"step-{step}"
    return folder, folder


def _extras(root: Path, layout: str, step: int) -> None:
    if layout != "fsdp":
        return
    folder = root / f"checkpoint-{step}"
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 24}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "rng_state.pth").write_bytes(b"not a pickle farcast may load")


def save_dcp_run(root: Path, weights: dict[int, dict[str, torch.Tensor]], layout: str = "fsdp", ranks: int = 1) -> Path:
    """One DCP checkpoint per step of `weights`, saved by `ranks` processes."""
    root.mkdir(parents=True, exist_ok=True)
    if ranks == 1:
        for step, tensors in weights.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(_state_dict(tensors, layout, step), checkpoint_id=folder_for(root, layout, step)[1])
            if layout == "fsdp":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dcp.save({"optimizer": {"step": torch.tensor(step)}}, checkpoint_id=root / f"checkpoint-{step}" / "optimizer_0")
    else:
        weights_file = root / ".weights.pt"
        torch.save(weights, weights_file)
        torch.multiprocessing.start_processes(
            _save_worker, args=(ranks, _free_port(), str(root), str(weights_file), layout), nprocs=ranks, start_method="spawn"
        )
        weights_file.unlink()
    for step in weights:
        _extras(root, layout, step)
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save_worker(rank: int, ranks: int, port: int, root: str, weights_file: str, layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    weights = torch.load(weights_file, weights_only=True)
    for step, tensors in weights.items():
        dcp.save(_state_dict(tensors, layout, step, mesh), checkpoint_id=folder_for(Path(root), layout, step)[1])
    _end_rank()


def fsdp_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def train_fsdp_run(root: Path, steps: int, every: int, ranks: int = 2) -> Path:
    """An MLP trained with Adam under FSDP2 (fully_shard) by `ranks` gloo processes on the CPU, its
    sharded state dict saved every `every` steps as accelerate saves it."""
    root.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.start_processes(
        _train_worker, args=(ranks, _free_port(), str(root), steps, every), nprocs=ranks, start_method="spawn"
    )
    return root


def _train_worker(rank: int, ranks: int, port: int, root: str, steps: int, every: int) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    model = fsdp_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(rank)
    target = torch.nn.Linear(16, 4)
    for step in range(1, steps + 1):
        x = torch.randn(32, 16, generator=generator)
        loss = (model(x) - target(x).detach()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % every == 0:
            folder = Path(root) / f"checkpoint-{step}"
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=folder / "pytorch_model_fsdp_0")
            if rank == 0:
                (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    _end_rank()


def _end_rank() -> None:
    """Every rank's files are written: end the process without tearing gloo down, whose destructor can
    abort ("terminate called without an active exception") or deadlock when ranks leave at once."""
    dist.barrier()
    os._exit(0)

"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes; launched by tests/test_distributed.py.

Usage: python tests/dist_scripts/fsdp2_norms.py OUT_DIR

Each rank writes OUT_DIR/rank<k>.json with, per layer, the gradient norm gradwatch
computed from the local shards (summed across ranks) and the norm of the same layer of an
unsharded copy of the model (same seed, same batch); first through the plain
``gradwatch.watch`` API, then through GradWatchCallback under Lightning's
ModelParallelStrategy (FSDP2), where the reference is the gathered full gradient.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from process_end import end_process

WORLD = 2


def make_model() -> nn.Sequential:
    # Uneven sizes (33 rows over 2 ranks) exercise FSDP2's padded shards.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 33), nn.Tanh(), nn.LayerNorm(33),
        nn.Linear(33, 10),
    )


def layer_norms(model: nn.Module) -> dict[str, float]:
    """Per-module norm of its own parameters' (full) gradients."""
    out = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
            out[name] = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    return out


def plain_api(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import gradwatch

    reference = make_model()
    sharded = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in sharded:
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    watcher = gradwatch.watch(sharded, every_n_steps=1, reporters=[])

    generator = torch.Generator().manual_seed(1)  # the same batch on every rank
    x = torch.randn(32, 64, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    nn.functional.cross_entropy(reference(x), y).backward()
    nn.functional.cross_entropy(sharded(x), y).backward()
    watcher.step()
    stats = watcher.latest
    local_only = {}
    for name, module in sharded.named_modules():
        grads = [p.grad.to_local() for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            local_only[name] = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    expected = layer_norms(reference)
    result = {
        "expected": expected,
        "got": {n: stats.layers[n].grad_norm for n in expected},
        "local_only": local_only,
        "numel": {n: stats.layers[n].numel for n in expected},
        "expected_numel": {
            n: sum(p.numel() for p in reference.get_submodule(n).parameters(recurse=False))
            for n in expected
        },
        "expected_global": float(
            torch.sqrt(sum(p.grad.double().pow(2).sum() for p in reference.parameters()))
        ),
        "got_global": stats.global_grad_norm,
        "expected_max": {
            n: max(float(p.grad.abs().max()) for p in reference.get_submodule(n).parameters(False))
            for n in expected
        },
        "got_max": {n: stats.layers[n].grad_max for n in expected},
        "sharded_types": sorted({type(p).__name__ for p in sharded.parameters()}),
        "disabled": watcher.disabled,
    }
    watcher.close()
    return result


def through_lightning(rank: int, out: Path) -> dict:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.integrations.lightning import GradWatchCallback

    class Sharded(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for module in self.net:
                if any(True for _ in module.parameters()):
                    fully_shard(module, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Reference(L.Callback):
        """Gathers the full gradients (a collective, on every rank) right before the step."""

        def __init__(self):
            self.norms = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms[trainer.global_step] = layer_norms(pl_module)

    reference = Reference()
    watch = GradWatchCallback(every_n_steps=1, reporters=[])
    generator = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(96, 64, generator=generator),
                         torch.randint(0, 10, (96,), generator=generator))
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, max_steps=3,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        callbacks=[reference, watch], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Sharded(), DataLoader(data, batch_size=16))
    history = {s.step: s for s in watch.watcher.history}
    return {
        "steps": sorted(history),
        "expected": {str(k): v for k, v in reference.norms.items()},
        "got": {
            str(step): {n: stats.layers[n].grad_norm for n in reference.norms[step]}
            for step, stats in history.items()
        },
        "disabled": watch.watcher.disabled,
    }


def worker(rank: int, init_file: str, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
        RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    result: dict = {}
    try:
        result["plain"] = plain_api(rank)
    except Exception:
        result["plain_error"] = traceback.format_exc()
    try:
        # Lightning finds LOCAL_RANK set: it treats these processes as launched for it and
        # joins the process group that already exists.
        result["lightning"] = through_lightning(rank, Path(out))
    except Exception:
        result["lightning_error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    end_process()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    init = out_dir / "pg_init"
    torch.multiprocessing.spawn(
        worker, args=(str(init), free_port(), str(out_dir)), nprocs=WORLD, join=True
    )

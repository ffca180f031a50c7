"""Training scripts that know nothing of gradwatch, for ``gradwatch run`` tests: each is
written into a test's folder and run unchanged, in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A 20-layer sigmoid MLP on synthetic data: the gradient vanishes long before the first
# layers. Ends with the exit code given as its first argument (default 0).
DEEP_SIGMOID = """
import sys
import torch
from torch import nn

torch.manual_seed(0)
layers = []
for _ in range(20):
    layers += [nn.Linear(32, 32), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
try:
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
finally:
    print("the script's finally block ran")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""

# A healthy net: 4 ReLU layers with He init, trained with Adam. A frozen teacher (in no
# optimizer) takes part in the loss: it must not be watched.
HEALTHY = """
import torch
from torch import nn

torch.manual_seed(0)
def net():
    layers = []
    for i in range(4):
        linear = nn.Linear(32, 32 if i < 3 else 10)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < 3 else [linear]
    return nn.Sequential(*layers)

class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()
    def forward(self, x):
        return self.body(x)

student, teacher = Student(), net().eval()
optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
for step in range(STEPS):
    optimizer.zero_grad()
    with torch.no_grad():
        soft = teacher(x).softmax(-1)
    logits = student(x)
    loss = nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(logits, soft)
    loss.backward()
    optimizer.step()
print("trained", STEPS)
"""

RAISES = """
import torch
from torch import nn

def train():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters())
    for step in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    raise RuntimeError("the data loader broke at step 5")

train()
"""

# A GAN: the generator is a deep sigmoid stack (its gradient vanishes), the discriminator
# a healthy LeakyReLU MLP; two optimizers; the discriminator steps first.
GAN = """
import torch
from torch import nn
torch.manual_seed(0)

class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        layers = [nn.Linear(8, 32)]
        for _ in range(16):
            layers += [nn.Sigmoid(), nn.Linear(32, 32)]
        self.net = nn.Sequential(*layers, nn.Sigmoid(), nn.Linear(32, 2))
    def forward(self, z):
        return self.net(z)

class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32),
                                 nn.LeakyReLU(0.2), nn.Linear(32, 1))
    def forward(self, x):
        return self.net(x)

def main():  # the models and optimizers are a running function's local variables
    G, D = Generator(), Discriminator()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    for step in range(STEPS):
        real = torch.randn(64, 2) * 0.5 + 2
        fake = G(torch.randn(64, 8))
        opt_d.zero_grad()
        loss_d = bce(D(real), torch.ones(64, 1)) + bce(D(fake.detach()), torch.zeros(64, 1))
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad()
        bce(D(fake), torch.ones(64, 1)).backward()
        opt_g.step()

main()
"""

# Writes what Python told it about itself, to compare with a plain ``python script.py``.
SELF_REPORT = """
import json, os, sys
with open(os.environ["SELF_REPORT"], "w") as out:
    json.dump({"argv": sys.argv, "file": __file__, "name": __name__, "path0": sys.path[0],
               "main_file": sys.modules["__main__"].__file__}, out)
"""


def script(folder: Path, text: str, name: str = "train.py", steps: int = 60) -> Path:
    path = folder / name
    path.write_text(text.replace("STEPS", str(steps)))
    return path


def environment(folder: Path, **extra: str) -> dict[str, str]:
    inherited = dict(os.environ)
    # Set by wandb in this test process once any test started a run: a script that
    # inherited it would join this process's W&B service instead of starting its own.
    inherited.pop("WANDB_SERVICE", None)
    return {
        **inherited,
        "PYTHONUNBUFFERED": "1",
        # Tiny models: on a busy 2-core machine extra threads spin-wait.
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(folder),
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }


def gradwatch_run(
    folder: Path, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m gradwatch run ARGS`` in ``folder``."""
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", *args],
        cwd=folder,
        env=environment(folder, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in ``folder``: the script alone, to compare with."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=folder,
        env=environment(folder, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )

# Lightning: a deep sigmoid LightningModule, its metrics in a CSV log.
LIGHTNING = """
import torch, lightning as L
from torch import nn
from lightning.pytorch.loggers import CSVLogger

class Deep(L.LightningModule):
    def __init__(self):
        super().__init__()
        layers = []
        for _ in range(20):
            layers += [nn.Linear(32, 32), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 10))
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(512, 32), torch.randint(0, 10, (512,)))
trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=CSVLogger("logs", name="deep"),
                    log_every_n_steps=15, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Deep(), torch.utils.data.DataLoader(data, batch_size=32))
print("callbacks:", ", ".join(type(c).__name__ for c in trainer.callbacks))
"""

# Transformers: a deep sigmoid nn.Module (returns {"loss": ...}) under the Trainer; the
# script saves the Trainer's log history.
TRANSFORMERS = """
import json, torch
from torch import nn
from transformers import Trainer, TrainingArguments

class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        for _ in range(20):
            layers += [nn.Linear(32, 32), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(32, 10))
    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

torch.manual_seed(0)
data = [{"x": x, "labels": y} for x, y in zip(torch.randn(512, 32), torch.randint(0, 10, (512,)))]
args = TrainingArguments(output_dir="out", use_cpu=True, report_to=[], save_strategy="no",
                         disable_tqdm=True, per_device_train_batch_size=32, logging_steps=15,
                         max_steps=STEPS, learning_rate=0.1, optim="sgd", seed=0,
                         dataloader_num_workers=0)
trainer = Trainer(model=Deep(), args=args, train_dataset=data)
trainer.train()
with open("log_history.json", "w") as out:
    json.dump(trainer.state.log_history, out)
print("callbacks:", ", ".join(type(c).__name__ for c in trainer.callback_handler.callbacks))
"""

# A plain Accelerate loop (accelerate wraps the optimizer; its step calls the inner one).
ACCELERATE = """
import torch
from torch import nn
from accelerate import Accelerator

torch.manual_seed(0)
layers = []
for _ in range(20):
    layers += [nn.Linear(32, 32), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.utils.data.TensorDataset(torch.randn(512, 32), torch.randint(0, 10, (512,)))
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model, optimizer, loader = accelerator.prepare(
    model, optimizer, torch.utils.data.DataLoader(data, batch_size=32))
for epoch in range(6):
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
print("optimizer:", type(optimizer).__name__)
"""

# Plain DDP over gloo, started by torchrun: a deep sigmoid net, each rank its own batch.
DDP = """
import os, torch, torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
torch.manual_seed(0)
layers = []
for _ in range(20):
    layers += [nn.Linear(32, 32), nn.Sigmoid()]
model = nn.parallel.DistributedDataParallel(nn.Sequential(*layers, nn.Linear(32, 10)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
torch.manual_seed(1 + dist.get_rank())
x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))
for step in range(STEPS):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
print("rank", dist.get_rank(), "done", flush=True)
dist.barrier()
dist.destroy_process_group()
"""

# The script's own W&B run (offline), logging its loss each step.
WANDB = """
import torch, wandb
from torch import nn

run = wandb.init(project="script", mode="offline", dir=".",
                 settings=wandb.Settings(silent=True, console="off"))
torch.manual_seed(0)
layers = []
for _ in range(20):
    layers += [nn.Linear(32, 32), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(32, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
for step in range(STEPS):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    run.log({"loss": loss.item()})
print("sync file:", run.settings.sync_file)
run.finish()
"""

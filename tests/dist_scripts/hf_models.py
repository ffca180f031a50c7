"""Models, data and Trainer arguments shared by the Transformers tests and the multi-process
scripts. Every model is built from a config (no download); data is synthetic or the digits
scikit-learn ships."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Nothing may try the network: no weights, no tokenizers, no telemetry.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make tests.* importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainingArguments,
)

from tests.support import digits  # noqa: E402

warnings.filterwarnings("ignore", ".*loss_type=None.*")
VOCAB = 128


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 with 2 blocks of width 32, from a config."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """BERT-tiny-sized (2 layers, width 32) sequence classifier, from a config."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config)


def token_data(n: int = 256, length: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences for language modelling (labels are the inputs: the model shifts them)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def classification_data(n: int = 256, length: int = 32, seed: int = 0) -> list[dict]:
    """Sequences labelled by whether their first token is in the upper half."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    return [{"input_ids": row, "labels": int(row[0] >= VOCAB // 2)} for row in ids]


class DeepSigmoid(nn.Module):
    """30 x (Linear(64) + Sigmoid) and a classifier: the gradient vanishes long before it
    reaches the first layers. A plain nn.Module whose forward returns {"loss": ...}."""

    def __init__(self, depth: int = 30, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


def deep_sigmoid(seed: int = 0) -> DeepSigmoid:
    torch.manual_seed(seed)
    return DeepSigmoid()


def digit_data() -> list[dict[str, torch.Tensor]]:
    x, y = digits()
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


def trainer_args(output_dir: str | Path, **overrides) -> TrainingArguments:
    """CPU, no reporting, no checkpoints, no progress bar, unless a test asks for them."""
    options = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=16,
        logging_steps=10,
        learning_rate=1e-3,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)

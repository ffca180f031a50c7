"""gradwatch with the Hugging Face Trainer: add one callback.

A tiny GPT-2 (built from a config, nothing downloaded) is fine-tuned for two tasks at once
with ``GPT2DoubleHeadsModel``: language modelling and picking the right ending among two
(multiple choice). The model computes both losses, but returns the multiple-choice one
as ``mc_loss``, beside ``loss``, and the Trainer optimizes ``loss`` only. Nothing fails:
the loss goes down, and the multiple-choice head simply never learns. gradwatch says so
by step 30 (GW104 no-gradient: ``multiple_choice_head.summary``), and the fix, a
Trainer whose ``compute_loss`` adds both losses, trains without a finding.

Per-layer gradient statistics (``gradwatch/...``) are added to the Trainer's own log rows,
so they sit next to ``loss`` and ``grad_norm`` in ``trainer.state.log_history`` and reach
any ``report_to`` integration (TensorBoard, W&B, ...).

    python examples/transformers_trainer.py     (needs: pip install 'gradwatch[transformers]')

Runs in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

import torch
from transformers import GPT2Config, GPT2DoubleHeadsModel, Trainer, TrainingArguments

from gradwatch.integrations.transformers import GradWatchCallback

warnings.filterwarnings("ignore", ".*loss_type=None.*")
VOCAB, CHOICES, LENGTH = 128, 2, 16


def endings_data(n: int = 256, seed: int = 0) -> list[dict]:
    """Two candidate sequences per example; the right one ends in token 7."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        ids = torch.randint(8, VOCAB, (CHOICES, LENGTH), generator=generator)
        answer = i % CHOICES
        ids[answer, -1] = 7
        examples.append(
            {
                "input_ids": ids,
                "labels": ids.clone(),  # language modelling on both candidates
                "mc_token_ids": torch.full((CHOICES,), LENGTH - 1),  # classify the last token
                "mc_labels": answer,
            }
        )
    return examples


def tiny_gpt2() -> GPT2DoubleHeadsModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2DoubleHeadsModel(config)


class BothLossesTrainer(Trainer):
    """The fix: optimize the language-modelling and the multiple-choice loss together."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss + outputs.mc_loss
        return (loss, outputs) if return_outputs else loss


def train(title: str, trainer_class: type[Trainer], output_dir: str) -> list:
    print(f"\n=== {title} ===")
    watch = GradWatchCallback()  # every 15 steps, the first step, and each logged step
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=45,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=15,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trainer_class(
        model=tiny_gpt2(), args=args, train_dataset=endings_data(), callbacks=[watch]
    )
    trainer.train()
    row = [r for r in trainer.state.log_history if "loss" in r][-1]
    head = "gradwatch/grad_norm/multiple_choice_head.summary"
    print(
        f"last log row (step {row['step']}): loss {row['loss']:.3f}, grad_norm "
        f"{row['grad_norm']:.3f}, {head} = {row.get(head, 'none (no gradient)')}"
    )
    return [f for f in watch.findings if f.severity != "info"]


def main() -> None:
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        broken = train("Trainer: optimizes `loss` only", Trainer, tmp)
        fixed = train("compute_loss adds mc_loss", BothLossesTrainer, tmp)
    print(
        f"\nbroken model: {len(broken)} finding(s) "
        f"({', '.join(sorted({f.code for f in broken})) or 'none'}); "
        f"fixed model: {len(fixed)} finding(s)"
    )


if __name__ == "__main__":
    main()

"""Trains a tiny student with DistillationTrainer and writes the logged losses as JSON.

Run alone (one process) or under ``torchrun --nproc_per_node=2`` (gloo on CPU); the test
compares the two loss curves on the same global batch.
"""
import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm.distill.trainer import DistillationTrainer  # noqa: E402
from tiny import exit_distributed, tiny_model, token_dataset  # noqa: E402

VOCAB = 96


def main(out_path, per_device_batch):
    torch.set_num_threads(1)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=per_device_batch,
        learning_rate=3e-3, max_steps=5, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
        weight_decay=0.0, ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    data = token_dataset(VOCAB, 32, 16, seed=0, max_pad=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    if trainer.args.process_index == 0:
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        with open(out_path, "w") as handle:
            json.dump({"losses": losses, "world_size": trainer.args.world_size}, handle)
    exit_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

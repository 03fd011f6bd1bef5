"""Run by test_distributed.py under torchrun: every rank scores its share and rank 0 saves."""
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny import calibration, tiny_model  # noqa: E402

from slimlm.importance import estimate_importance  # noqa: E402

# loss_drop_samples=5 cuts the third batch (rows 4, 5 of 6) on rank 0: the slicing path runs too.
ARGS = dict(metrics=("activation", "wanda", "magnitude"), batch_size=2, progress=False, loss_drop_samples=5)


def scores_of(model_type):
    model = tiny_model(model_type, "scoring", num_hidden_layers=3)
    input_ids, mask = calibration(batch=7, pad_from={2: 4, 5: 0})
    return estimate_importance(model, {"input_ids": input_ids, "attention_mask": mask}, **ARGS)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    scores = scores_of(sys.argv[2])
    if dist.get_rank() == 0:
        scores.save(sys.argv[1])
    dist.destroy_process_group()

"""One distillation step through ``DistillationTrainer.compute_loss`` with the student (and
optionally the teacher) sharded by FSDP (``fsdp1``: ``FullyShardedDataParallel``, ``fsdp2``:
``fully_shard``); writes the loss and the full gradients as JSON.

Run alone (one process, nothing sharded) or under ``torchrun --nproc_per_node=2`` (gloo on
CPU, each rank half of the batch). accelerate's FSDP plugin needs an accelerator, so the
Trainer's own ``--fsdp`` path cannot run on a CPU; this drives the same loss code on models
sharded the way that path shards them (every decoder layer, then the root).
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


def shard(model, version):
    """Shards as the Trainer's --fsdp auto-wrap does: every decoder layer, then the root."""
    if version == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                        device_id=torch.device("cpu"), use_orig_params=True)
    from torch.distributed.fsdp import fully_shard

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_grads(model, version):
    if version == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {name.replace("_fsdp_wrapped_module.", ""): param.grad.tolist()
                    for name, param in model.named_parameters()}
    return {name: (param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad).tolist()
            for name, param in model.named_parameters()}


def main(out_path, version, shard_teacher):
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=8 // world,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    data = token_dataset(VOCAB, 8, 16, seed=0, max_pad=4)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    num_items = (batch["labels"][:, 1:] != -100).sum()
    rank = args.process_index
    if world > 1:
        student = shard(student, version)
        if shard_teacher:
            teacher = shard(teacher, version)
        batch = {k: v.chunk(world)[rank] for k, v in batch.items()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = full_grads(student, version)
    total = loss.detach() / world
    if world > 1:
        torch.distributed.all_reduce(total)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"loss": total.item(), "grads": grads, "world_size": world}, handle)
    exit_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "shard-teacher")

"""Gradient draws of the tiny model under real FSDP2 sharding (torch `fully_shard`, gloo, CPU).

Run with `torchrun --nproc_per_node N tests/fsdp_worker.py OUT.json`. accelerate enables FSDP
only on GPU-class devices, so this drives the trainer's own code (`PairLoss.gradient_draws`,
`GradientVector` on DTensor shards) with torch's FSDP2 directly; the stand-in below is only
the part of accelerate's interface those functions call.
"""

import contextlib
import json
import sys

import torch
import torch.distributed as dist


class FSDPOnCPU:
    """accelerate's interface as the recipe uses it, for a model torch's fully_shard wrapped."""

    def __init__(self, sharded: bool):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.FSDP if sharded else DistributedType.NO
        self.num_processes = dist.get_world_size() if dist.is_initialized() else 1
        self.process_index = dist.get_rank() if dist.is_initialized() else 0

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        if self.distributed_type.name == "FSDP":
            raise AssertionError("the recipe must not use no_sync under FSDP")
        return contextlib.nullcontext()

    autocast = staticmethod(contextlib.nullcontext)


def main(out_path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from bvpo.alpha import gradient_statistics
    from bvpo.chat import build_tokenizer, completion_text
    from bvpo.config import Params
    from bvpo.gradients import GradientVector
    from bvpo.modeling import build_tiny_model
    from bvpo.sequences import encode
    from bvpo.reference import reference_logps
    from bvpo.train import PairLoss, PairSet

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, 32, 2, 4, 64, 128, seed=0)
    data = {}
    for mode, thinking in (("think", True), ("nothink", False)):
        chosen, rejected = [], []
        for i in range(12):
            a, b = 10 + i, 30 + 2 * i
            right = completion_text(f"{a}+{b}={a + b}" if thinking else None, str(a + b), tokenizer.eos_token)
            wrong = completion_text(f"{a}+{b}={a + b + 2}" if thinking else None, str(a + b + 2), tokenizer.eos_token)
            chosen.append(encode(tokenizer, f"Compute {a}+{b}.", right, thinking))
            rejected.append(encode(tokenizer, f"Compute {a}+{b}.", wrong, thinking))
        ref_c, ref_r = reference_logps(model, chosen, rejected, tokenizer.pad_token_id)
        data[mode] = PairSet(chosen, rejected, ref_c - 0.2, ref_r + 0.1)
    sharded = world > 1
    if sharded:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    params = Params()
    params.train.alpha_draws, params.train.alpha_draw_size, params.train.micro_batch_size = 3, 4, 2
    pair_loss = PairLoss(params, data, tokenizer.pad_token_id)
    accelerator = FSDPOnCPU(sharded)
    vector = GradientVector(list(model.parameters()), sketch_dim=4096, seed=0, sharded=sharded)
    draws = {mode: pair_loss.gradient_draws(model, mode, 7, vector, accelerator)[0] for mode in ("think", "nothink")}
    if dist.get_rank() == 0:
        stats = gradient_statistics(draws["think"], draws["nothink"])
        json.dump({"draws": {m: d.tolist() for m, d in draws.items()}, "stats": stats,
                   "sharded": [type(p).__name__ for p in model.parameters()][:1]}, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

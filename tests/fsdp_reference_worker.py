"""The reference under FSDP mixed precision (torch `fully_shard`, gloo, CPU): scored by the
trainer's `load_reference_model` + `reference_logps`, it must equal the FSDP-wrapped policy's
own log-probs at step 0. Run with `torchrun --nproc_per_node 1 tests/fsdp_reference_worker.py
MODEL_DIR OUT.json`; accelerate enables FSDP only on GPU-class devices, so the policy is wrapped
the way accelerate does it (MixedPrecisionPolicy(param_dtype=bf16) per decoder layer and at the
root, plus bf16 autocast around the forward)."""

import contextlib
import json
import sys

import torch
import torch.distributed as dist


class FSDPAccelerator:
    """The part of accelerate's interface the reference loader reads."""

    distributed_type = type("DistributedType", (), {"name": "FSDP"})()
    mixed_precision = "bf16"
    device = torch.device("cpu")

    @staticmethod
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)


def main(model_dir: str, out_path: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from bvpo.chat import completion_text
    from bvpo.modeling import load_model, load_tokenizer, sdpa_in_fp32
    from bvpo.sequences import encode
    from bvpo.reference import cpu_bf16, load_reference_model, reference_logps

    dist.init_process_group("gloo")
    tokenizer = load_tokenizer(model_dir)
    trace = "\n".join(f"{i}+{i}={2 * i}" for i in range(10, 90))
    prompts = [f"Compute {a}+{b}." for a, b in zip(range(10, 14), range(20, 24))]
    chosen = [encode(tokenizer, p, completion_text(trace, "7", tokenizer.eos_token), True) for p in prompts]
    rejected = [encode(tokenizer, p, completion_text(trace[::-1][:500], "8", tokenizer.eos_token), True)
                for p in prompts]

    policy = load_model(model_dir)
    policy_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for layer in policy.model.layers:
        fully_shard(layer, mp_policy=policy_mp)
    fully_shard(policy, mp_policy=policy_mp)
    accelerator = FSDPAccelerator()
    # As `train_method` scores the policy (on a CPU under bf16 its attention runs in fp32).
    with torch.no_grad(), sdpa_in_fp32(policy, cpu_bf16(accelerator)):
        policy_logps = reference_logps(policy, chosen, rejected, tokenizer.pad_token_id, autocast=accelerator.autocast)
    with torch.no_grad():
        matched = reference_logps(load_reference_model(model_dir, accelerator), chosen, rejected,
                                  tokenizer.pad_token_id, autocast=accelerator.autocast)
        plain = reference_logps(load_model(model_dir).eval(), chosen, rejected, tokenizer.pad_token_id,
                                autocast=accelerator.autocast)
    gap = {name: max((policy_logps[i] - ref[i]).abs().max().item() for i in range(2))
           for name, ref in (("matched", matched), ("plain", plain))}
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump({"gap": gap, "tokens": len(chosen[0].input_ids)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

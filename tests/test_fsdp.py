"""Sharded (FSDP2) gradients: each process sketches its own shard and the sketches are summed,
which gives the sketch of the full gradient. 2 gloo processes with torch's fully_shard vs 1
unsharded process: the same draws (same pairs), the same statistics and α*."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(300)
WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_worker(processes: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(29700 + processes + os.getpid() % 200), str(WORKER), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp_shard_sketches_sum_to_the_full_gradients_sketch(tmp_path):
    one = run_worker(1, tmp_path / "one.json")
    two = run_worker(2, tmp_path / "two.json")
    assert two["sharded"] == ["DTensor"] and one["sharded"] == ["Parameter"]
    for mode in ("think", "nothink"):
        a, b = torch.tensor(one["draws"][mode]), torch.tensor(two["draws"][mode])
        assert a.shape == (3, 4096) and a.norm() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * a.abs().max().item())
    for key in ("var_think", "var_nothink", "bias_gap_sq_raw"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4)


@pytest.mark.slow
def test_reference_under_fsdp_mixed_precision_matches_the_policy_at_step_0(tmp_path):
    """FSDP casts parameters (not buffers) to bf16 for the forward; the reference is loaded the
    same way, so the policy/reference log-ratio is exactly 0 before the first update. Scored the
    DDP way (fp32 weights under autocast) it is not: 0.51 nats on 4k-token pairs on an H200."""
    from bvpo.chat import build_tokenizer
    from bvpo.modeling import build_tiny_model, save_model

    tokenizer = build_tokenizer()
    save_model(build_tiny_model(tokenizer, 64, 2, 4, 256, 1024, seed=0), tokenizer, tmp_path / "model")
    out = tmp_path / "gap.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("fsdp_reference_worker.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                             str(29900 + os.getpid() % 90), str(worker), str(tmp_path / "model"), str(out)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["tokens"] > 400
    assert found["gap"]["matched"] == 0.0
    assert found["gap"]["plain"] > 1e-2  # what the check above guards against


def test_reference_dtype_follows_the_fsdp_mixed_precision_policy():
    """accelerate keeps a policy given in the config (fills one in from `mixed_precision` only
    where there is none): the reference must follow the policy FSDP actually applies. Only the
    accelerator is a stand-in (accelerate enables FSDP only on GPU-class devices); the policies
    are torch's own."""
    from types import SimpleNamespace

    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from bvpo.reference import reference_param_dtype

    def accelerator(kind: str, mixed_precision: str, policy=None):
        return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), mixed_precision=mixed_precision,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(mixed_precision_policy=policy)))

    assert reference_param_dtype(accelerator("MULTI_GPU", "bf16")) is None  # DDP: autocast only
    assert reference_param_dtype(accelerator("FSDP", "bf16")) is torch.bfloat16
    assert reference_param_dtype(accelerator("FSDP", "no")) is None
    fp32_params = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.bfloat16)
    assert reference_param_dtype(accelerator("FSDP", "bf16", fp32_params)) is torch.float32
    fp16_params = MixedPrecisionPolicy(param_dtype=torch.float16)
    assert reference_param_dtype(accelerator("FSDP", "no", fp16_params)) is torch.float16


@pytest.mark.parametrize("arch, layer", [("qwen2", "Qwen2DecoderLayer"), ("qwen3", "Qwen3DecoderLayer"),
                                         ("llama", "LlamaDecoderLayer")])
def test_the_fsdp_config_wraps_each_decoders_own_layers(arch, layer, monkeypatch):
    """configs/fsdp.yaml read as `accelerate launch` reads it (its launch parser and environment),
    then accelerate's FSDP2 wrap policy on a tiny model of each architecture: every decoder layer
    gets its own FSDP unit. The file used to name Qwen3DecoderLayer, which a Qwen2 (R1-Distill) or
    Llama model does not have: accelerate refused to start."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from realistic_model import tiny_decoder

    config = Path(__file__).resolve().parent.parent / "configs" / "fsdp.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    assert env["FSDP_VERSION"] == "2" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    model = tiny_decoder(arch, vocab_size=64, max_length=32)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert {type(model.get_submodule(name)).__name__ for name in wrapped} == {layer}

"""Shared fixtures. The suite runs offline with telemetry off, like the product."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bvpo.runtime import configure_environment

ROOT = Path(__file__).resolve().parent.parent
configure_environment(ROOT)
# Tests run many small torch ops while other processes (training subprocesses) are busy:
# spinning OpenMP threads would collapse throughput on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tokenizer():
    from bvpo.chat import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from bvpo.modeling import build_tiny_model

    return build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_length=192, seed=0)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A tiny random sequence-classification reward model (one output), saved like a user's."""
    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("reward_model")
    Qwen3ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch

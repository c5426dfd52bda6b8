import math

import pytest
import torch

from bvpo.losses import bvpo_loss, completion_token_logps, dpo_loss, estimator_loss, ipo_loss, sequence_logps


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_hand_computed_values():
    pc, pr = torch.tensor([-5.0, -3.0]), torch.tensor([-7.0, -2.0])
    rc, rr = torch.tensor([-6.0, -3.5]), torch.tensor([-6.5, -2.5])
    losses, cr, rrw = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # Row 0: (−5+7) − (−6+6.5) = 1.5 → −log σ(0.75); row 1: (−3+2) − (−3.5+2.5) = 0 → log 2.
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.75), math.log(2)], abs=1e-6)
    assert cr.tolist() == pytest.approx([0.5, 0.25])
    assert rrw.tolist() == pytest.approx([-0.25, 0.25])


def test_dpo_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -4.0, -2.0, -2.0))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    h = 0.1 * 3.0
    assert losses.item() == pytest.approx(-0.8 * log_sigmoid(h) - 0.2 * log_sigmoid(-h), abs=1e-6)


def test_ipo_loss_is_squared_distance_to_half_inverse_beta():
    losses, _, _ = ipo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                            torch.tensor([-1.5]), beta=0.25)
    assert losses.item() == pytest.approx((1.0 - 2.0) ** 2)


def test_sequence_logps_scores_only_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 1, 2, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    total, count = sequence_logps(logits, ids, mask)
    logp = torch.log_softmax(logits, -1)
    expected0 = logp[0, 1, 3] + logp[0, 2, 4]
    expected1 = logp[1, 0, 6] + logp[1, 1, 1] + logp[1, 2, 2] + logp[1, 3, 3]
    assert total.tolist() == pytest.approx([expected0.item(), expected1.item()], abs=1e-5)
    assert count.tolist() == [2, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logps_match_full_log_softmax_in_value_and_gradient(dtype):
    torch.manual_seed(3)
    logits = (3 * torch.randn(3, 11, 50)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 11))
    weights = torch.randn(3, 11)
    full = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (full_grad,) = torch.autograd.grad((full * weights).sum(), logits)
    # 3 rows x 50 vocab x 2 positions per chunk: six checkpointed chunks, the last one short.
    chunked = completion_token_logps(logits, labels, chunk_elements=3 * 50 * 2)
    (chunked_grad,) = torch.autograd.grad((chunked * weights).sum(), logits)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_grad.float(), full_grad.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    with torch.no_grad():
        torch.testing.assert_close(completion_token_logps(logits, labels, chunk_elements=1), full, rtol=0, atol=1e-5)


def test_bvpo_gradient_is_the_alpha_mixture_of_estimator_gradients():
    torch.manual_seed(1)
    theta = torch.randn(6, requires_grad=True)
    x_t, x_e = torch.randn(4, 6), torch.randn(4, 6)

    def estimator(x):
        logps = x @ theta  # stands in for sequence log-probs that depend on the weights
        return estimator_loss(logps[:2], logps[2:], torch.tensor([3.0, 4.0]), torch.tensor([5.0, 2.0]),
                              torch.zeros(2), torch.zeros(2), "sigmoid", 2.0, 0.0, 1.0).loss

    alpha = 0.3
    g_mixed, = torch.autograd.grad(bvpo_loss(estimator(x_t), estimator(x_e), alpha), theta)
    g_t, = torch.autograd.grad(estimator(x_t), theta)
    g_e, = torch.autograd.grad(estimator(x_e), theta)
    assert torch.allclose(g_mixed, alpha * g_t + (1 - alpha) * g_e, atol=1e-6)


def test_estimator_loss_gradient_matches_finite_differences():
    torch.manual_seed(2)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    tokens = torch.tensor([2.0, 3.0], dtype=torch.float64)

    def f(t):
        logps = x @ t
        return estimator_loss(logps[:2], logps[2:], tokens, tokens, torch.zeros(2, dtype=torch.float64),
                              torch.zeros(2, dtype=torch.float64), "sigmoid", 0.7, 0.1, 0.5).loss

    grad, = torch.autograd.grad(f(theta), theta)
    eps = 1e-6
    for i in range(3):
        bump = torch.zeros(3, dtype=torch.float64)
        bump[i] = eps
        numeric = (f(theta.detach() + bump) - f(theta.detach() - bump)) / (2 * eps)
        assert grad[i].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


def test_nll_term_is_mean_per_token_nll_of_chosen():
    chosen = torch.tensor([-4.0, -9.0])
    result = estimator_loss(chosen, torch.tensor([-5.0, -5.0]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0]),
                            chosen, torch.tensor([-5.0, -5.0]), "sigmoid", 1.0, 0.0, 0.5)
    assert result.nll.item() == pytest.approx((2.0 + 3.0) / 2)
    assert result.preference.item() == pytest.approx(math.log(2))  # policy == reference
    assert result.loss.item() == pytest.approx(math.log(2) + 0.5 * 2.5)


def test_pure_methods_drop_the_unused_estimator():
    nan = torch.tensor(float("nan"))
    assert bvpo_loss(torch.tensor(1.0), nan, 1.0).item() == 1.0
    assert bvpo_loss(nan, torch.tensor(2.0), 0.0).item() == 2.0


def test_preference_weight_zero_is_the_nll_only_control():
    chosen, rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-5.0, -1.0])
    tokens = torch.tensor([2.0, 3.0])
    control = estimator_loss(chosen, rejected, tokens, tokens, torch.zeros(2), torch.zeros(2), "sigmoid", 2.0, 0.0,
                             1.0, preference_weight=0.0)
    assert control.loss.item() == pytest.approx(control.nll.item())
    assert control.preference.item() > 0  # still computed, for the logs


def test_reference_cache_key_follows_the_scoring_code(tmp_path):
    """Editing the code that encodes or scores sequences must not reuse cached reference log-probs."""
    import shutil
    from pathlib import Path

    import bvpo.train
    from bvpo.reference import SCORING_MODULES, scoring_code_digest

    package = Path(bvpo.train.__file__).parent
    copy = tmp_path / "bvpo"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert scoring_code_digest(copy) == scoring_code_digest()
    digests = set()
    for name in SCORING_MODULES:
        original = (copy / name).read_text()
        (copy / name).write_text(original + "\n# changed\n")
        digests.add(scoring_code_digest(copy))
        (copy / name).write_text(original)
    assert len(digests) == len(SCORING_MODULES) and scoring_code_digest() not in digests


def test_bvpo_loss_terms_add_up_to_the_objective():
    trace, empty = torch.tensor(2.0), torch.tensor(5.0)
    assert bvpo_loss(trace, empty, 0.3).item() == pytest.approx(0.3 * 2 + 0.7 * 5)
    assert (bvpo_loss(trace, None, 0.3) + bvpo_loss(None, empty, 0.3)).item() == pytest.approx(0.3 * 2 + 0.7 * 5)
    assert bvpo_loss(trace, torch.tensor(float("nan")), 1.0).item() == 2.0
    with pytest.raises(ValueError, match="no term with a positive weight"):
        bvpo_loss(None, empty, 1.0)


def test_packing_under_fsdp_and_flex_attention_on_a_cpu_are_refused_at_launch(monkeypatch):
    """FSDP's passes are collective, so processes with different numbers of packed rows would
    wait on each other; FlexAttention has no backward on a CPU. (A stand-in accelerator: FSDP
    runs only on GPU-class devices, and the check reads its distributed type and device.)"""
    from types import SimpleNamespace

    from bvpo.train import TrainingError, check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def accelerator(kind: str, device: str):
        return SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name=kind), mixed_precision="bf16",
                               scaler=None, device=torch.device(device))

    with pytest.raises(TrainingError, match="max_tokens_per_micro_batch with FSDP"):
        check_launch(accelerator("FSDP", "cuda"), "flex_attention", packed=True)
    with pytest.raises(TrainingError, match="flex_attention needs a GPU"):
        check_launch(accelerator("NO", "cpu"), "flex_attention", packed=True)
    check_launch(accelerator("FSDP", "cuda"), "sdpa", packed=False)
    check_launch(accelerator("MULTI_GPU", "cuda"), "flex_attention", packed=True)


def test_gradient_checkpointing_beside_fsdp_checkpointing_is_refused_at_launch(monkeypatch):
    """FSDP's activation checkpointing can come from the environment or accelerate's default
    config, which the params check does not read: the launch check asks accelerate's own FSDP
    plugin. (A stand-in accelerator around the real plugin, as above: FSDP runs only on
    GPU-class devices.)"""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from bvpo.train import TrainingError, check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def accelerator(kind: str, fsdp_checkpointing: bool | None):
        plugin = None if fsdp_checkpointing is None else \
            FullyShardedDataParallelPlugin(activation_checkpointing=fsdp_checkpointing)
        return SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name=kind), mixed_precision="bf16",
                               scaler=None, device=torch.device("cuda"), state=SimpleNamespace(fsdp_plugin=plugin))

    with pytest.raises(TrainingError, match="would recompute every layer twice: set train.gradient_checkpointing"):
        check_launch(accelerator("FSDP", True), gradient_checkpointing=True)
    check_launch(accelerator("FSDP", True), gradient_checkpointing=False)
    check_launch(accelerator("FSDP", False), gradient_checkpointing=True)
    check_launch(accelerator("MULTI_GPU", None), gradient_checkpointing=True)


def test_compile_beside_accelerates_dynamo_plugin_or_fsdp_is_refused_at_launch(monkeypatch):
    """accelerate compiles the whole model when its dynamo backend is set (config file,
    environment or default config): the launch check asks accelerate's own plugin. FSDP would
    wrap the compiled layers in its activation checkpointing: refused too."""
    from types import SimpleNamespace

    from accelerate.utils import TorchDynamoPlugin

    from bvpo.train import TrainingError, check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def accelerator(backend: str, kind: str = "NO"):
        return SimpleNamespace(num_processes=1, distributed_type=SimpleNamespace(name=kind), mixed_precision="no",
                               scaler=None, device=torch.device("cpu"),
                               state=SimpleNamespace(fsdp_plugin=None, dynamo_plugin=TorchDynamoPlugin(backend=backend)))

    with pytest.raises(TrainingError, match="would compile the model twice: set train.compile: false"):
        check_launch(accelerator("inductor"), compile_layers=True)
    check_launch(accelerator("inductor"), compile_layers=False)
    check_launch(accelerator("no"), compile_layers=True)
    check_launch(accelerator("no", "MULTI_GPU"), compile_layers=True)
    # FSDP from the environment or accelerate's default config, which the params check does not read.
    with pytest.raises(TrainingError, match="train.compile with FSDP is not supported"):
        check_launch(accelerator("no", "FSDP"), compile_layers=True)

"""Gradient vectors for BVPO's statistics: full flattened, or a seeded count-sketch.

A count-sketch maps coordinate j to bucket h(j) with sign s(j): (Sx)_b = Σ_{h(j)=b} s(j)·x_j.
E[⟨Sx, Sy⟩] = ⟨x, y⟩, so squared norms, variances and squared mean gaps are unbiased, at
O(parameters) time and O(dim) memory. Buckets and signs are regenerated from a per-parameter
seed each call, so nothing of parameter size is stored and every process agrees on them.
"""

from __future__ import annotations

import torch


class GradientVector:
    def __init__(self, parameters: list[torch.nn.Parameter], sketch_dim: int = 0, seed: int = 0):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.dim = sketch_dim or sum(p.numel() for p in self.parameters)

    def __call__(self) -> torch.Tensor:
        """The current .grad of every parameter as one float32 vector (sketched if asked)."""
        device = self.parameters[0].device
        if not self.sketch_dim:
            return torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
                for p in self.parameters
            ])
        out = torch.zeros(self.sketch_dim, device=device)
        for index, p in enumerate(self.parameters):
            if p.grad is None:
                continue
            generator = torch.Generator(device=p.device).manual_seed(self.seed * 1_000_003 + index)
            n = p.numel()
            bucket = torch.randint(0, self.sketch_dim, (n,), generator=generator, device=p.device)
            sign = torch.randint(0, 2, (n,), generator=generator, device=p.device).float() * 2 - 1
            out.index_add_(0, bucket.to(device), (p.grad.detach().flatten().float() * sign).to(device))
        return out


def mixed_variance(trace_draws: torch.Tensor, empty_draws: torch.Tensor, alpha: float) -> float:
    """Per-draw variance (trace of the covariance) of α·g_t + (1−α)·g_e, pairing draw i of each."""
    n = min(len(trace_draws), len(empty_draws))
    mixed = alpha * trace_draws[:n].double() + (1 - alpha) * empty_draws[:n].double()
    return ((mixed - mixed.mean(0)) ** 2).sum().item() / (n - 1)

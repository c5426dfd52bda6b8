"""Gradient vectors for BVPO's statistics: a seeded count-sketch (default) or the full gradient.

A count-sketch maps coordinate j to bucket h(j) with sign s(j): (Sx)_b = Σ_{h(j)=b} s(j)·x_j.
E[⟨Sx, Sy⟩] = ⟨x, y⟩, so squared norms, variances and squared mean gaps are unbiased, at
O(parameters) time and O(dim) memory. h and s are a hash of (seed, parameter index, global
coordinate), recomputed in bounded chunks on every call: nothing of parameter size is stored,
every process agrees on them, and a rank that holds only a shard of a parameter (FSDP) can
sketch exactly its own coordinates.

Because the sketch is linear, the sketch of a full gradient is the SUM of the sketches of its
disjoint shards: under FSDP each rank sketches its local shard and one all-reduce of `dim`
floats gives every rank the sketch of the whole gradient, never gathering the gradient itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # coordinates hashed at once: bounds the temporary int64 tensors to 32 MiB
# Up to this many coordinates (8 bytes each: 64 MiB) the hashes are kept between calls: hashing
# is nearly all of a sketch's time (caching it is an order of magnitude faster) and a telemetry
# step sketches two or three times. Larger models rehash on every call: nothing of their size is kept.
_CACHE_COORDINATES = 1 << 23


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors of values < 2^32.
    Every product stays below 2^59, so int64 arithmetic is exact on every device."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def sketch_hash(seed: int, parameter_index: int, start: int, count: int, dim: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket, sign) of global coordinates start .. start+count−1 of one parameter."""
    key = _mix(torch.tensor([(seed * 1_000_003 + parameter_index) & _MASK32], device=device))
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    h = _mix((j & _MASK32) ^ key ^ _mix(j >> 32))
    bucket = h % dim
    sign = ((_mix(h ^ 0x9E3779B9) & 1) * 2 - 1).float()
    return bucket, sign


def local_shard(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The part of `tensor` this rank holds and the flat offset of its first element in the
    full tensor. Plain tensors: all of it, offset 0. FSDP2 DTensors (sharded on dim 0): the
    local rows, as `torch.chunk` splits them."""
    if not hasattr(tensor, "to_local"):
        return tensor, 0
    local = tensor.to_local()
    placements = tensor.placements
    if len(placements) != 1 or not placements[0].is_shard() or placements[0].dim != 0:
        raise NotImplementedError(f"gradient sketch: unsupported sharding {placements} (expected FSDP2's Shard(0))")
    world, rank = tensor.device_mesh.size(), tensor.device_mesh.get_local_rank()
    rows_per_rank = -(-tensor.shape[0] // world)
    row_numel = tensor[0].numel() if tensor.ndim > 1 else 1
    return local, min(rank * rows_per_rank, tensor.shape[0]) * row_numel


class GradientVector:
    """The model's current gradient as one vector, identical on every process.

    `sketch_dim` > 0: a count-sketch of that dimension (used only when it is smaller than the
    model); 0: the full flattened fp32 gradient (a parameter-sized copy, for small models).
    `sharded`: parameters are FSDP shards, so the full path is impossible and the sketches of
    the shards are summed over processes."""

    def __init__(self, parameters: list[torch.nn.Parameter], sketch_dim: int = 0, seed: int = 0,
                 sharded: bool = False):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.seed = seed
        self.sharded = sharded
        n_parameters = sum(p.numel() for p in self.parameters)
        self.sketched = sharded or (0 < sketch_dim < n_parameters)
        if sharded and not sketch_dim:
            raise ValueError("sharded (FSDP) gradients need train.grad_sketch_dim > 0")
        self.dim = sketch_dim if self.sketched else n_parameters
        self.cached = self.sketched and n_parameters <= _CACHE_COORDINATES
        self._hashes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _hash(self, index: int, start: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, start)
        if key in self._hashes:
            return self._hashes[key]
        bucket, sign = sketch_hash(self.seed, index, start, count, self.dim, device)
        if self.cached:
            self._hashes[key] = bucket.int(), sign
        return bucket, sign

    def _sketch(self) -> torch.Tensor:
        device = self.parameters[0].device
        out = torch.zeros(self.dim, device=device)
        for index, p in enumerate(self.parameters):
            if p.grad is None:
                continue
            grad, offset = local_shard(p.grad)
            flat = grad.detach().reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                piece = flat[start:start + _CHUNK].float()
                bucket, sign = self._hash(index, offset + start, piece.numel(), piece.device)
                out.index_add_(0, bucket.to(device), (piece * sign).to(device))
        return out

    def __call__(self, synced: bool = True) -> torch.Tensor:
        """The gradient now in .grad. `synced`: .grad already holds the all-process gradient
        (DDP after a synchronising backward, FSDP always); otherwise each process holds its own
        part of an average (a DDP backward under `no_sync`) and the vectors are averaged."""
        if self.sketched:
            vector = self._sketch()
        else:
            vector = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                for p in self.parameters
            ])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self.sharded:
                dist.all_reduce(vector, op=dist.ReduceOp.SUM)
            elif not synced:
                dist.all_reduce(vector, op=dist.ReduceOp.SUM)
                vector /= dist.get_world_size()
        return vector

    def dot_current(self, other: torch.Tensor) -> tuple[float, float]:
        """(‖g‖², ⟨g, other⟩) for the synced gradient g now in .grad and a vector from this
        object. The full path reads .grad in place, so it never builds a second parameter-sized
        vector beside `other`."""
        if self.sketched:
            g = self()
            return (g @ g).item(), (g @ other).item()
        sq = torch.zeros((), dtype=torch.float64, device=other.device)
        dot = torch.zeros((), dtype=torch.float64, device=other.device)
        offset = 0
        for p in self.parameters:
            n = p.numel()
            if p.grad is not None:
                flat = p.grad.detach().reshape(-1).double()
                sq += flat @ flat
                dot += flat @ other[offset:offset + n].double()
            offset += n
        return sq.item(), dot.item()


def mixed_variance(trace_draws: torch.Tensor, empty_draws: torch.Tensor, alpha: float) -> float:
    """Per-draw variance (trace of the covariance) of α·g_t + (1−α)·g_e, pairing draw i of each."""
    n = min(len(trace_draws), len(empty_draws))
    mixed = alpha * trace_draws[:n].double() + (1 - alpha) * empty_draws[:n].double()
    return ((mixed - mixed.mean(0)) ** 2).sum().item() / (n - 1)

"""GaLore-style gradient low-rank projection inside AdamW, with optional 8-bit moments (bitsandbytes).

For a projected m×n parameter with gradient G, every `update_proj_gap` optimizer steps (step % T == 0, the
first step included) the projector P is refreshed from the SVD of the current G = U S Vᵀ:

    proj_type std:  m >= n -> right, P = V[:, :r]ᵀ ∈ R^{r×n}, R = G Pᵀ ∈ R^{m×r}, update back = scale · N P
                    m <  n -> left,  P = U[:, :r]   ∈ R^{m×r}, R = Pᵀ G ∈ R^{r×n}, update back = scale · P N
    (reverse_std swaps the rule; left / right force a side)

Adam runs on R (moments of the projected shape) and the normalised update N = m̂ / (sqrt(v̂) + eps) goes back
through P, times `scale`. So per m×n matrix the state is 2·r·max(m, n) + r·min(m, n) elements (AdamW:
2·m·n), every update has rank <= r before weight decay, and `scale = 0` leaves the parameter still. Moments
are kept across projector refreshes (as GaLore does). r is clamped to min(m, n).

8-bit moments (`bits=8`): Adam's moments of tensors with >= 4096 elements are stored blockwise-quantised with
bitsandbytes' dynamic maps (signed for m, unsigned for v; one float32 absmax per 256 elements, as its 8-bit
optimizers), dequantised for the update and re-quantised after it. Projectors stay in float32.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["GaLoreAdamW", "check_8bit", "galore_state_elements", "projection_side"]

BLOCK, MIN_8BIT = 256, 4096
PROJ_TYPES = ("std", "reverse_std", "left", "right")


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type={proj_type!r}; expected one of {PROJ_TYPES}")


def galore_state_elements(m: int, n: int, rank: int) -> int:
    """Adam state + projector elements of one projected m×n matrix: 2·r·max(m, n) + r·min(m, n) (std)."""
    r = min(rank, m, n)
    return 2 * r * max(m, n) + r * min(m, n)


def _new_projector(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return (vh[:rank] if side == "right" else u[:, :rank]).contiguous()  # [r, n] or [m, r]


def _project(g: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    return g.float() @ p.T if side == "right" else p.T @ g.float()  # [m, r] or [r, n]


def _project_back(x: torch.Tensor, p: torch.Tensor, side: str) -> torch.Tensor:
    return x @ p if side == "right" else p @ x  # [m, n]


_CODES: dict[tuple[bool, torch.device], torch.Tensor] = {}


def check_8bit(device: torch.device) -> None:
    """Raise a clear error if bitsandbytes cannot hold 8-bit states on `device`."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise RuntimeError(f"8-bit optimizer states need bitsandbytes (pip install bitsandbytes): {e}") from None
    try:
        bnbf.quantize_blockwise(torch.zeros(BLOCK, device=device), blocksize=BLOCK)
    except Exception as e:  # noqa: BLE001  (any failure means: not on this device; older builds are CUDA-only)
        import bitsandbytes

        raise RuntimeError(f"8-bit optimizer states: bitsandbytes {bitsandbytes.__version__} cannot quantise on {device} "
                           f"({type(e).__name__}: {e}); use a CUDA device or a bitsandbytes build with {device.type} "
                           f"support, or optim_bits=32") from None


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    key = (signed, device)
    if key not in _CODES:
        _CODES[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def _store(state: dict[str, Any], key: str, x: torch.Tensor, bits: int) -> None:
    if bits == 8 and x.numel() >= MIN_8BIT:
        import bitsandbytes.functional as bnbf

        q, qs = bnbf.quantize_blockwise(x.contiguous(), code=_code(key == "exp_avg", x.device), blocksize=BLOCK)
        state[key], state[key + "_absmax"] = q, qs.absmax
    else:
        state[key] = x


def _load(state: dict[str, Any], key: str, shape: torch.Size) -> torch.Tensor:
    x = state[key]
    if x.dtype != torch.uint8:
        return x
    import bitsandbytes.functional as bnbf

    out = bnbf.dequantize_blockwise(x, absmax=state[key + "_absmax"], code=_code(key == "exp_avg", x.device), blocksize=BLOCK)
    return out.view(shape)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's bias correction) whose groups may carry `rank` (None = no
    projection), `update_proj_gap`, `scale`, `proj_type`; `bits` (32 or 8) applies to every group's moments."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bits: int = 32):
        if bits not in (8, 32):
            raise ValueError(f"GaLoreAdamW: bits={bits}; expected 8 or 32")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": None,
                    "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
        super().__init__(params, defaults)
        self.bits = bits
        for g in self.param_groups:
            if g["rank"] is not None:
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad or g["rank"] < 1 or g["update_proj_gap"] < 1:
                    raise ValueError(f"GaLoreAdamW: projected groups need 2-D parameters, rank >= 1 and update_proj_gap >= 1; "
                                     f"got shapes {bad}, rank {g['rank']}, gap {g['update_proj_gap']}")
                projection_side((1, 1), g["proj_type"])
        if bits == 8:
            devs = {p.device for g in self.param_groups for p in g["params"]}
            for d in devs:
                check_8bit(d)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                self._update(p, g, b1, b2)
        return loss

    def _update(self, p: torch.Tensor, g: dict[str, Any], b1: float, b2: float) -> None:
        st = self.state[p]
        grad = p.grad.float()
        side = None
        if g["rank"] is not None:
            side = projection_side(p.shape, g["proj_type"])
            if "step" not in st or st["step"] % g["update_proj_gap"] == 0:
                st["projector"] = _new_projector(grad, min(g["rank"], *p.shape), side)
            grad = _project(grad, st["projector"], side)  # [m, r] or [r, n]
        if "step" not in st:
            st["step"] = 0
            _store(st, "exp_avg", torch.zeros_like(grad), self.bits)
            _store(st, "exp_avg_sq", torch.zeros_like(grad), self.bits)
        m, v = _load(st, "exp_avg", grad.shape), _load(st, "exp_avg_sq", grad.shape)
        st["step"] += 1
        t = st["step"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(g["eps"])
        upd = (m / (1 - b1**t)) / denom
        if side is not None:
            upd = _project_back(upd, st["projector"], side) * g["scale"]
        if g["weight_decay"]:
            p.mul_(1 - g["lr"] * g["weight_decay"])
        p.add_(upd.to(p.dtype), alpha=-g["lr"])
        _store(st, "exp_avg", m, self.bits)
        _store(st, "exp_avg_sq", v, self.bits)

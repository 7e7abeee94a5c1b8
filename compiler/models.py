"""Vision Transformer definitions written for vitamin (no timm), and their ONNX export.

:class:`ViT` follows the DeiT/timm layout so that its ONNX export looks like what users bring:
a Conv2d patch embedding (kernel = stride = patch), a CLS token concatenated in front of the
patches, a learned position embedding, pre-norm blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))``,
a final LayerNorm and a Linear head on the CLS token.

Three switches produce the export variants the frontend has to recognise:

``gelu``      ``"erf"`` (``nn.GELU()``) or ``"tanh"`` (``nn.GELU(approximate="tanh")``)
``norm``      ``"layernorm"`` (``nn.LayerNorm``) or ``"decomposed"`` (ReduceMean/Sub/Pow/Sqrt/Div)
``attn``      ``"explicit"`` (q @ k^T * scale -> softmax -> @ v, as timm) or ``"sdpa"``
              (``torch.nn.functional.scaled_dot_product_attention``)

torch is imported lazily by the functions that need it, so importing the compiler does not
import torch; only :func:`export_onnx` and the model constructors need it.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

__all__ = ["ViT", "deit_tiny", "vit_micro", "vit_digits", "export_onnx", "PRESETS", "M3ViT",
           "MOE_PRESETS", "m3vit_tiny", "m3vit_micro"]


def _nn():
    import torch
    from torch import nn
    return torch, nn


def _build_classes():
    """Define the torch.nn.Module classes on first use (keeps ``import torch`` lazy)."""
    torch, nn = _nn()
    F = torch.nn.functional

    class DecomposedLayerNorm(nn.Module):
        """LayerNorm written out element by element, as some exporters and hand-written models do.

        Exports as ReduceMean -> Sub -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul -> Add.
        """

        def __init__(self, dim, eps):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            mu = x.mean(-1, keepdim=True)
            d = x - mu
            var = d.pow(2).mean(-1, keepdim=True)
            return d / torch.sqrt(var + self.eps) * self.weight + self.bias

    class Attention(nn.Module):
        def __init__(self, dim, heads, qkv_bias, sdpa):
            super().__init__()
            if dim % heads:
                raise ValueError(f"dim must be a multiple of heads, not {dim} and {heads}")
            self.heads = heads
            self.head_dim = dim // heads
            self.scale = self.head_dim ** -0.5
            self.sdpa = sdpa
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if self.sdpa:
                x = F.scaled_dot_product_attention(q, k, v)
            else:
                attn = (q @ k.transpose(-2, -1)) * self.scale
                attn = attn.softmax(dim=-1)
                x = attn @ v
            x = x.transpose(1, 2).reshape(b, n, c)
            return self.proj(x)

    class Mlp(nn.Module):
        def __init__(self, dim, hidden, gelu):
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
            self.fc2 = nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, dim, heads, mlp_ratio, qkv_bias, eps, norm_layer, gelu, sdpa):
            super().__init__()
            self.norm1 = norm_layer(dim, eps)
            self.attn = Attention(dim, heads, qkv_bias, sdpa)
            self.norm2 = norm_layer(dim, eps)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch, in_chans, dim):
            super().__init__()
            h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
            self.num_patches = (h // patch) * (w // patch)
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class ViT(nn.Module):
        """A DeiT/timm-layout Vision Transformer (see the module docstring)."""

        def __init__(self, img_size, patch, in_chans, num_classes, dim, depth, heads,
                     mlp_ratio=4.0, qkv_bias=True, eps=1e-6, *, gelu="erf", norm="layernorm",
                     attn="explicit", seed=0):
            super().__init__()
            if img_size % patch:
                raise ValueError(f"img_size must be a multiple of patch, not {img_size} and "
                                 f"{patch}")
            if gelu not in ("erf", "tanh"):
                raise ValueError(f"gelu must be 'erf' or 'tanh', not {gelu!r}")
            if norm not in ("layernorm", "decomposed"):
                raise ValueError(f"norm must be 'layernorm' or 'decomposed', not {norm!r}")
            if attn not in ("explicit", "sdpa"):
                raise ValueError(f"attn must be 'explicit' or 'sdpa', not {attn!r}")
            if norm == "layernorm":
                def norm_layer(d, e):
                    return nn.LayerNorm(d, eps=e)
            else:
                norm_layer = DecomposedLayerNorm
            self.img_size = img_size
            self.in_chans = in_chans
            self.depth = depth
            self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
            self.blocks = nn.Sequential(*[
                Block(dim, heads, mlp_ratio, qkv_bias, eps, norm_layer, gelu, attn == "sdpa")
                for _ in range(depth)])
            self.norm = norm_layer(dim, eps)
            self.head = nn.Linear(dim, num_classes)
            self._init(seed)
            self.eval()

        @torch.no_grad()
        def _init(self, seed):
            # A local generator: the same seed gives the same weights whatever the global RNG did.
            g = torch.Generator().manual_seed(seed)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif p.ndim == 1:               # LayerNorm gains: near 1, but not exactly
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                elif name in ("cls_token", "pos_embed"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                else:                           # Linear/Conv weights: fan-in scaled (as PyTorch)
                    fan_in = math.prod(p.shape[1:])
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))

        def forward(self, x):
            x = self.patch_embed(x)
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x), dim=1) + self.pos_embed
            x = self.blocks(x)
            x = self.norm(x)
            return self.head(x[:, 0])

    class MoEMlp(nn.Module):
        """Mixture of experts as M3ViT writes it, in a form every exporter keeps static.

        The gate of the task is ``gate[task]`` (a Gather on the stacked, bias-free gate
        matrices), softmax over all experts, top-k probabilities (not renormalised) scattered
        into a dense ``[.., n_experts]`` mask, and the output is the mask-weighted sum of every
        expert's MLP (onnxruntime computes all experts; vitamin only the chosen ones).
        """

        def __init__(self, dim, hidden, n_experts, top_k, n_tasks, gelu):
            super().__init__()
            if not 1 <= top_k <= n_experts:
                raise ValueError(f"top_k must be in 1..{n_experts}, not {top_k}")
            self.top_k = top_k
            self.gate = nn.Parameter(torch.zeros(n_tasks, dim, n_experts))
            self.experts = nn.ModuleList([Mlp(dim, hidden, gelu) for _ in range(n_experts)])

        def forward(self, x, task):
            probs = (x @ self.gate[task]).softmax(dim=-1)
            val, idx = probs.topk(self.top_k, dim=-1)
            mask = torch.zeros_like(probs).scatter(-1, idx, val)
            out = None
            for e, expert in enumerate(self.experts):
                y = expert(x) * mask[..., e:e + 1]
                out = y if out is None else out + y
            return out

    class MoEBlock(nn.Module):
        def __init__(self, dim, heads, eps, gelu, moe):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = Attention(dim, heads, True, False)
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.mlp = MoEMlp(dim, gelu=gelu, **moe)

        def forward(self, x, task):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x), task)

    class M3ViT(nn.Module):
        """Multi-task MoE ViT in M3ViT's layout (see :func:`m3vit_tiny`)."""

        def __init__(self, img_size, patch, in_chans, dim, depth, heads, mlp_ratio, n_experts,
                     expert_hidden, top_k, n_tasks, num_classes=None, final_norm=False,
                     eps=1e-6, gelu="erf", seed=0):
            super().__init__()
            h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            if h % patch or w % patch:
                raise ValueError(f"image {h}x{w} is not a multiple of the patch {patch}")
            self.img_size = (h, w)
            self.in_chans = in_chans
            self.n_tasks = n_tasks
            self.patch_embed = PatchEmbed((h, w), patch, in_chans, dim)
            # row 0 is the CLS token with its position embedding folded in (as M3ViT)
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
            moe = dict(hidden=expert_hidden, n_experts=n_experts, top_k=top_k, n_tasks=n_tasks)
            self.blocks = nn.ModuleList([
                MoEBlock(dim, heads, eps, gelu, moe) if i % 2 else
                Block(dim, heads, mlp_ratio, True, eps, lambda d, e: nn.LayerNorm(d, eps=e),
                      gelu, False)
                for i in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=eps) if final_norm else None
            if num_classes:
                self.head_w = nn.Parameter(torch.zeros(n_tasks, dim, num_classes))
                self.head_b = nn.Parameter(torch.zeros(n_tasks, num_classes))
            else:
                self.head_w = None
            ViT._init(self, seed)
            with torch.no_grad():       # stacked per-task matrices: fan-in is dim, not dim * n
                g = torch.Generator().manual_seed(seed + 1)
                for blk in self.blocks[1::2]:
                    blk.mlp.gate.copy_(torch.randn(blk.mlp.gate.shape, generator=g)
                                       / math.sqrt(dim))
                if self.head_w is not None:
                    self.head_w.copy_(torch.randn(self.head_w.shape, generator=g) / math.sqrt(dim))
            self.eval()

        def forward(self, x, task):
            x = self.patch_embed(x)
            x = torch.cat((self.pos_embed[:, :1].expand(x.shape[0], -1, -1),
                           x + self.pos_embed[:, 1:]), dim=1)
            for i, blk in enumerate(self.blocks):
                x = blk(x, task) if i % 2 else blk(x)
            if self.norm is not None:
                x = self.norm(x)
            if self.head_w is None:
                return x
            return x[:, 0] @ self.head_w[task] + self.head_b[task]

    return {"ViT": ViT, "M3ViT": M3ViT}


_CLASSES = None


def _classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_classes()
    return _CLASSES


def ViT(img_size, patch, in_chans, num_classes, dim, depth, heads, mlp_ratio=4.0, qkv_bias=True,
        eps=1e-6, *, gelu="erf", norm="layernorm", attn="explicit", seed=0):
    """A DeiT/timm-layout Vision Transformer (a ``torch.nn.Module`` in eval mode).

    Parameters
    ----------
    img_size, patch, in_chans : int
        Square input ``[B, in_chans, img_size, img_size]``; square patches, ``img_size % patch``
        must be 0.
    num_classes, dim, depth, heads : int
        Head outputs, embedding width, number of blocks, attention heads (``dim % heads == 0``).
    mlp_ratio : float
        MLP hidden width over ``dim``.
    qkv_bias : bool
        Bias on the fused qkv projection.
    eps : float
        LayerNorm epsilon.
    gelu, norm, attn : str
        Export variants (see the module docstring).
    seed : int
        Weights are drawn from a generator seeded with this; the same seed gives the same model.
    """
    return _classes()["ViT"](img_size, patch, in_chans, num_classes, dim, depth, heads,
                             mlp_ratio, qkv_bias, eps, gelu=gelu, norm=norm, attn=attn,
                             seed=seed)


def M3ViT(img_size, patch, in_chans, dim, depth, heads, mlp_ratio, n_experts, expert_hidden,
          top_k, n_tasks, num_classes=None, final_norm=False, eps=1e-6, *, gelu="erf", seed=0):
    """A multi-task mixture-of-experts ViT in M3ViT's layout (a ``torch.nn.Module``, eval mode).

    ``forward(x, task)`` takes the image ``[B, in_chans, H, W]`` and the task index (a 0-d int64
    tensor). Even blocks have a dense MLP (``dim * mlp_ratio``), odd blocks a mixture of
    ``n_experts`` MLPs ``dim -> expert_hidden -> dim`` with one bias-free gate ``[dim,
    n_experts]`` per task, softmax over all experts and the top-``top_k`` probabilities as
    weights (not renormalised). The CLS token is folded into row 0 of the position embedding.
    With ``num_classes`` a task-selected head (``head_w[task]``, ``head_b[task]``) classifies the
    CLS token (after a LayerNorm if ``final_norm``); without it the output is the token matrix
    ``[B, tokens, dim]`` (M3ViT's backbone has no final LayerNorm).
    """
    return _classes()["M3ViT"](img_size, patch, in_chans, dim, depth, heads, mlp_ratio, n_experts,
                               expert_hidden, top_k, n_tasks, num_classes, final_norm, eps,
                               gelu=gelu, seed=seed)


MOE_PRESETS = {
    # M3ViT-tiny as Edge-MoE runs it: 3x128x256, patch 16 -> 128 patches + CLS = 129 tokens.
    "m3vit_tiny": dict(img_size=(128, 256), patch=16, in_chans=3, dim=192, depth=12, heads=3,
                       mlp_ratio=4.0, n_experts=16, expert_hidden=384, top_k=2, n_tasks=2),
    # Test model: every op of M3ViT-tiny, 9 tokens, one dense and one MoE block.
    "m3vit_micro": dict(img_size=(16, 32), patch=8, in_chans=3, dim=32, depth=2, heads=2,
                        mlp_ratio=2.0, n_experts=4, expert_hidden=32, top_k=2, n_tasks=2),
    # Two-task digits model of the demo (task 0: the digit, task 1: a second label).
    "m3vit_digits": dict(img_size=8, patch=2, in_chans=1, dim=48, depth=2, heads=3,
                         mlp_ratio=2.0, n_experts=4, expert_hidden=48, top_k=2, n_tasks=2,
                         num_classes=10, final_norm=True),
}


def m3vit_tiny(**kw):
    """M3ViT-tiny (Edge-MoE's model): 782.7 M MACs, 129 tokens of 192, 12 blocks, 16 experts."""
    return M3ViT(**{**MOE_PRESETS["m3vit_tiny"], **kw})


def m3vit_micro(**kw):
    """Test MoE model: 16x32 RGB, patch 8 (9 tokens), dim 32, 2 blocks (the 2nd: 4 experts)."""
    return M3ViT(**{**MOE_PRESETS["m3vit_micro"], **kw})


PRESETS = {
    # DeiT-Tiny (Touvron et al. 2021): 5.7 M parameters, 197 tokens.
    "deit_tiny": dict(img_size=224, patch=16, in_chans=3, num_classes=1000, dim=192, depth=12,
                      heads=3, mlp_ratio=4.0),
    # Smallest model that still has every op of DeiT: 17 tokens, two blocks.
    "vit_micro": dict(img_size=32, patch=8, in_chans=3, num_classes=10, dim=32, depth=2, heads=2,
                      mlp_ratio=4.0),
    # sklearn's 8x8 grayscale digits: 2x2 patches -> 16 patches + CLS = 17 tokens.
    "vit_digits": dict(img_size=8, patch=2, in_chans=1, num_classes=10, dim=48, depth=3, heads=3,
                       mlp_ratio=2.0),
}


def deit_tiny(**kw):
    """DeiT-Tiny: 224x224 RGB, patch 16, dim 192, depth 12, 3 heads, 1000 classes."""
    return ViT(**{**PRESETS["deit_tiny"], **kw})


def vit_micro(**kw):
    """Test model: 32x32 RGB, patch 8, dim 32, depth 2, 2 heads, 10 classes."""
    return ViT(**{**PRESETS["vit_micro"], **kw})


def vit_digits(**kw):
    """sklearn digits model: 8x8 grayscale, patch 2, dim 48, depth 3, 3 heads, 10 classes."""
    return ViT(**{**PRESETS["vit_digits"], **kw})


def export_onnx(model, path, dynamo: bool, batch: int = 1, *, opset: int | None = None,
                dynamic_batch: bool = False, external_data: bool | None = None):
    """Export ``model`` to ONNX at ``path`` and return the path.

    Parameters
    ----------
    model : ViT
        Model in eval mode (``model.img_size``, ``model.in_chans`` give the input shape).
    path : str or Path
        Output file. The dynamo path may write ``<path>.data`` next to it (external data).
    dynamo : bool
        False: TorchScript exporter, opset 17 (LayerNormalization, Erf-GELU, shape ops).
        True: torch.export-based exporter, opset 18 or newer (default: the exporter's own).
    batch : int
        Batch size of the example input (the exported shape unless ``dynamic_batch``).
    opset : int, optional
        Opset; default 17 (legacy) or the exporter's default (dynamo).
    dynamic_batch : bool
        Make the batch dimension symbolic (``"batch"``), as many published models have it.
    external_data : bool, optional
        Dynamo only: weights in ``<path>.data``. Default: only when the weights exceed 1 MiB.
    """
    import logging

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hw = model.img_size if isinstance(model.img_size, tuple) else (model.img_size,) * 2
    x = torch.randn(batch, model.in_chans, *hw, generator=torch.Generator().manual_seed(0))
    args = (x,)
    names = dict(input_names=["input"], output_names=["logits"])
    if getattr(model, "n_tasks", None):        # multi-task: the task index is an input
        args = (x, torch.tensor(0, dtype=torch.int64))
        names["input_names"] = ["input", "task"]
    # The exporters warn about their own internals (TracerWarning, deprecations of the
    # TorchScript path, onnxscript version notes); none of it concerns the caller, and the test
    # suite turns warnings into errors.
    # The dynamo exporter also logs that torchvision's ops are missing (we never use them).
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # The exporters warn about their own internals (TracerWarning, deprecations of the
    # TorchScript path, onnxscript version notes); none of it concerns the caller, and the test
    # suite turns warnings into errors.
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if not dynamo:
                torch.onnx.export(
                    model, args, str(path), dynamo=False,
                    opset_version=17 if opset is None else opset,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}
                    if dynamic_batch else None, **names)
            else:
                if external_data is None:
                    external_data = sum(p.numel() * 4 for p in model.parameters()) > 1 << 20
                data = path.with_name(path.name + ".data")
                if data.exists():       # a stale weights file from an earlier export
                    os.remove(data)
                dyn = ({"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch
                       else None)
                torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset,
                                  external_data=external_data, dynamic_shapes=dyn,
                                  report=False, verbose=False, **names)
    finally:
        quiet.setLevel(level)
    return path

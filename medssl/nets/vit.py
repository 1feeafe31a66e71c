"""Vision Transformer blocks and an encoder that runs on whatever tokens it is given (e.g. only the visible ones).

ViT: Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words", https://arxiv.org/abs/2010.11929. Pre-norm blocks
with stochastic depth (drop path; Huang et al., 2016, https://arxiv.org/abs/1603.09382) as used by MAE (He et al.,
2022, https://arxiv.org/abs/2111.06377).

MONAI's ``TransformerBlock`` has no drop path and reaches scaled-dot-product attention only through an einops
rearrange; these blocks keep the same parameter layout (fused ``qkv`` ordered ``(3, heads, head_dim)``) with a
zero-copy path into ``torch.nn.functional.scaled_dot_product_attention``. On x86 CPUs where PyTorch's BLAS (MKL)
falls back to AVX2, their float32 matrix products run through oneDNN instead (:class:`OneDNNLinear`): about twice
as fast on the AMD EPYC measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from medssl.masking.base import MaskOutput
from medssl.nets.patch_embed import ViewSpec, build_patch_embed
from medssl.nets.pos_embed import sincos_pos_embed
from medssl.nets.tokens import gather_tokens, patchify

__all__ = [
    "cpu_vendor",
    "onednn_beats_blas",
    "onednn_matmul",
    "OneDNNLinear",
    "SelfAttention",
    "MLP",
    "TransformerBlock",
    "ViTEncoder",
    "MultiViewEncoder",
    "ViewPositions",
    "parse_views",
    "check_view_images",
    "new_view_embeddings",
    "check_mask",
    "init_transformer_weights",
]


def _check_width(dim: int, num_heads: int) -> None:
    if dim <= 0 or num_heads <= 0 or dim % num_heads:
        raise ValueError(f"width {dim} must be a positive multiple of num_heads {num_heads}.")


def _check_tokens(tokens: Tensor, dim: int) -> None:
    if tokens.ndim != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"tokens must be [B, N, {dim}], got shape {tuple(tokens.shape)}.")


def onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` computed by oneDNN (CPU, float32 or bfloat16), with no autograd support.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]``.

    Each operand must be contiguous or the transpose of a contiguous matrix: other strides (e.g. a slice of rows
    of a wider matrix) send oneDNN to its reference kernels, about a thousand times slower.
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` with the forward product and both backward products computed by oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        return onednn_matmul(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: D102
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        flat = grad.view(-1, grad.shape[-1])
        grad_x = onednn_matmul(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # oneDNN copies a transposed left operand: transpose the narrower of grad [M, N] and x [M, K].
            rows = x.view(-1, x.shape[-1])
            if weight.shape[0] > weight.shape[1]:
                grad_weight = onednn_matmul(rows.t(), flat.t()).t().contiguous()  # (x^T grad)^T
            else:
                grad_weight = onednn_matmul(flat.t(), rows.t())  # grad^T x
        grad_bias = flat.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def onednn_beats_blas() -> bool:
    """Whether oneDNN's float32 products outrun PyTorch's BLAS on this CPU: MKL on an x86 CPU with AVX-512 whose
    vendor is not Intel.

    MKL dispatches its AVX-512 kernels on Intel CPUs only and runs AVX2 code elsewhere; oneDNN picks AVX-512 wherever
    the CPU has it. Measured: on an AMD EPYC with AVX-512 oneDNN ran a 2048^2 product at twice MKL's rate; on an Intel
    Xeon (Sapphire Rapids) MKL was 1.09x oneDNN on it and 1.25x on the MAE's linear layers, and PyTorch's fused
    attention (MKL products) 1.6x the blockwise oneDNN attention below.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if not torch.backends.mkl.is_available() or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return cpu_vendor() not in ("", "GenuineIntel")


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) from ``cpuinfo``; empty where unknown."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as lines:
            return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")
    except OSError:
        return ""


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU products (forward and backward) run through oneDNN where it beats the BLAS.

    PyTorch sends float32 CPU matrix products to MKL, which runs its AVX2 code on non-Intel x86 CPUs; there oneDNN's
    AVX-512 products are about twice as fast (see :func:`onednn_beats_blas`, which sets the default of
    ``OneDNNLinear.enabled``). The operator is the one behind ``torch.compile``'s CPU linear fusions. Anything else
    (other devices or dtypes, autocast, which already uses oneDNN for bf16, tracing by ``torch.compile`` or
    ``torch.jit.trace``, so exported graphs stay portable to other devices) takes plain ``F.linear``; set
    ``OneDNNLinear.enabled = False`` to always do so, e.g. for double backward, which the oneDNN path does not
    support, or ``True`` to use oneDNN on any CPU. Parameters, initialisation and state dict are nn.Linear's.

    Args:
        in_features: input width.
        out_features: output width.
        bias: learn an additive bias.
    """

    enabled: bool = onednn_beats_blas()

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[..., in_features]``. Returns: ``[..., out_features]``."""
        # Other weight layouts would send oneDNN to its reference kernels.
        if self.weight.dtype == torch.float32 and self.weight.is_contiguous() and _use_onednn(x):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _use_onednn(x: Tensor) -> bool:
    """Whether float32 CPU products on ``x`` should run through oneDNN (see :class:`OneDNNLinear`)."""
    return (
        OneDNNLinear.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


# Query rows per block: a block's float32 scores (rows x keys) stay within ~2.5 MB, about one core's L2 cache.
_ATTENTION_BLOCK_ELEMENTS = 640 * 1024
# Below this many tokens the per-head products are too small to beat the fused kernel (measured: 2304 tokens 13 %
# faster, 576 even, 216 a third slower).
_ONEDNN_ATTENTION_MIN_TOKENS = 1024


class _OneDNNAttentionFunction(torch.autograd.Function):
    """Softmax attention from a fused ``qkv`` tensor with oneDNN products, one block of queries at a time.

    The forward keeps each query row's log-sum-exp; the backward recomputes a block's probabilities from it instead
    of storing them, as FlashAttention does (Dao et al., 2022, https://arxiv.org/abs/2205.14135), so memory stays
    linear in the number of tokens. Every product operand is a contiguous matrix or its transpose, and the wide
    ones are contiguous: oneDNN copies a transposed input, which for the ``[N, block]`` probabilities cost more than
    the product, so the backward accumulates ``dK^T`` and ``dV^T`` (``[Dh, N]``) rather than ``dK`` and ``dV``.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor) -> Tensor:  # noqa: D102
        batch, length, _, heads, head_dim = qkv.shape
        block = min(length, max(16, _ATTENTION_BLOCK_ELEMENTS // length))
        scale = head_dim**-0.5
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # [B, H, N, Dh] each, contiguous
        q = q * scale  # scaled once here rather than every block of scores
        v_t = v.transpose(-1, -2).contiguous()  # [B, H, Dh, N]: the probabilities' right operand
        out = qkv.new_empty(batch, length, heads, head_dim)  # token layout: reshapes to [B, N, D] for free
        logsumexp = qkv.new_empty(batch, heads, length, 1)
        for b in range(batch):
            for h in range(heads):
                for start in range(0, length, block):
                    rows = slice(start, start + block)
                    scores = onednn_matmul(q[b, h, rows], k[b, h])
                    logsumexp[b, h, rows] = torch.logsumexp(scores, dim=-1, keepdim=True)
                    probs = scores.sub_(logsumexp[b, h, rows]).exp_()
                    out[b, rows, h] = onednn_matmul(probs, v_t[b, h])
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.block = block
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> Tensor:  # noqa: D102
        q, k, v, out, logsumexp = ctx.saved_tensors  # q is scaled by head_dim ** -0.5
        batch, heads, length, head_dim = q.shape
        scale = head_dim**-0.5
        grad_heads = grad_out.permute(0, 2, 1, 3).contiguous()  # [B, H, N, Dh]
        # Row-wise dot(dO, O): the softmax Jacobian term of every query.
        delta = (grad_out * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, N, 1]
        k_t = k.transpose(-1, -2).contiguous()  # [B, H, Dh, N]
        grad_qkv = q.new_empty(batch, length, 3, heads, head_dim)
        for b in range(batch):
            for h in range(heads):
                # dK^T and dV^T [Dh, N]: x @ w.T with the wide [block, N] matrices as the (transposed) right operand
                grad_k_t, grad_v_t = torch.zeros_like(k_t[b, h]), torch.zeros_like(k_t[b, h])
                for start in range(0, length, ctx.block):
                    rows = slice(start, start + ctx.block)
                    q_rows, grad_rows = q[b, h, rows], grad_heads[b, h, rows]
                    probs = onednn_matmul(q_rows, k[b, h]).sub_(logsumexp[b, h, rows]).exp_()
                    grad_v_t += onednn_matmul(grad_rows.t(), probs.t())
                    # dS of the unscaled scores; the scale goes on the narrow products instead (dK: q is scaled)
                    grad_scores = onednn_matmul(grad_rows, v[b, h]).sub_(delta[b, h, rows]).mul_(probs)
                    grad_qkv[b, rows, 0, h] = onednn_matmul(grad_scores, k_t[b, h]).mul_(scale)
                    grad_k_t += onednn_matmul(q_rows.t(), grad_scores.t())
                grad_qkv[b, :, 1, h] = grad_k_t.t()
                grad_qkv[b, :, 2, h] = grad_v_t.t()
        return grad_qkv


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and PyTorch's fused attention kernels.

    For long sequences in float32 (no dropout on the weights) on CPUs where :class:`OneDNNLinear` is enabled, the
    attention runs through oneDNN products a block of queries at a time, like PyTorch's CPU flash kernel but on
    AVX-512 (that kernel's float32 products use MKL's AVX2 code on AMD CPUs); everywhere else through
    ``F.scaled_dot_product_attention``.

    With ``memory_slots = M > 0`` the attention is memory-augmented (Cornia et al., 2020, "Meshed-Memory Transformer
    for Image Captioning", https://arxiv.org/abs/1912.08226; the encoder of MemMC-MAE, Tian et al., 2023,
    https://arxiv.org/abs/2203.11725): learnable ``memory_keys`` and ``memory_values`` ``[M, D]``, split into heads like
    the projected tokens, are appended to every sample's keys and values, so each head attends over ``N + M`` keys
    ``[B, H, N + M, D / H]`` and the output stays ``[B, N, D]``. They hold input-independent patterns learnt from the
    training data. ``memory_slots = 0`` adds no parameter and computes exactly the plain attention.

    Args:
        dim: token width ``D``.
        num_heads: number of heads; ``D`` must be a multiple of it.
        qkv_bias: bias on the ``qkv`` projection (True in ViT/MAE/CineMA).
        attn_drop: dropout on the attention weights, training only.
        proj_drop: dropout after the output projection, training only.
        memory_slots: learnable memory slots ``M`` joined to the keys and values (0: none).

    Raises:
        ValueError: when ``dim`` is not a positive multiple of ``num_heads`` or ``memory_slots`` is negative.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        memory_slots: int = 0,
    ) -> None:
        super().__init__()
        _check_width(dim, num_heads)
        if memory_slots < 0:
            raise ValueError(f"memory_slots must be >= 0, got {memory_slots}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.memory_slots = int(memory_slots)
        self.qkv = OneDNNLinear(dim, 3 * dim, bias=qkv_bias)
        self.proj = OneDNNLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.memory_slots:
            # Meshed-Memory's scales: keys like projected keys (variance 1 / head width), values averaging to O(1).
            self.memory_keys = nn.Parameter(torch.randn(self.memory_slots, dim) * self.head_dim**-0.5)
            self.memory_values = nn.Parameter(torch.randn(self.memory_slots, dim) * self.memory_slots**-0.5)

    def _memory(self, slots: Tensor, like: Tensor) -> Tensor:
        """Memory ``[M, D]`` as ``[B, H, M, D / H]`` keys or values beside ``like`` ``[B, H, N, D / H]``."""
        heads = slots.to(like.dtype).view(self.memory_slots, self.num_heads, self.head_dim).transpose(0, 1)
        return heads.unsqueeze(0).expand(like.shape[0], -1, -1, -1)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all tokens.

        Args:
            x: ``[B, N, D]``.

        Returns:
            ``[B, N, D]``.
        """
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        dropout = self.attn_drop if self.training else 0.0
        if not self.memory_slots and dropout == 0.0 and length >= _ONEDNN_ATTENTION_MIN_TOKENS and _use_onednn(qkv):
            out = _OneDNNAttentionFunction.apply(qkv)
        else:
            # Strided q/k/v views straight from the fused projection: the fused kernels take them without a copy,
            # and lay their output out as [B, N, H, Dh], so the transpose-reshape below is free as well.
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if self.memory_slots:
                k = torch.cat([k, self._memory(self.memory_keys, k)], 2)
                v = torch.cat([v, self._memory(self.memory_values, v)], 2)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).transpose(1, 2)
        return self.proj_drop(self.proj(out.reshape(batch, length, dim)))


class MLP(nn.Module):
    """Transformer feed-forward: ``fc1`` -> GELU -> ``fc2``, with dropout after each (training only).

    Args:
        dim: token width.
        hidden_dim: inner width (``mlp_ratio * dim``; ratio 4 in ViT).
        drop: dropout rate.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = OneDNNLinear(dim, hidden_dim)
        self.fc2 = OneDNNLinear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[..., dim]``. Returns: ``[..., dim]``."""
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))`` then ``x + drop_path(mlp(norm2(x)))``.

    Args:
        dim: token width ``D``.
        num_heads: attention heads.
        mlp_ratio: MLP inner width over ``D`` (4 in ViT).
        qkv_bias: bias on the ``qkv`` projection.
        drop: dropout in attention output and MLP.
        attn_drop: dropout on attention weights.
        drop_path: probability of dropping the residual branch per sample (stochastic depth).
        memory_slots: memory slots of the attention (see :class:`SelfAttention`; 0: plain attention).

    Raises:
        ValueError: when ``dim`` is not a positive multiple of ``num_heads`` or ``memory_slots`` is negative.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        memory_slots: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, memory_slots=memory_slots
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, N, D]``. Returns: ``[B, N, D]``."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTEncoder(nn.Module):
    """A stack of :class:`TransformerBlock` and a final LayerNorm, applied to the tokens it is given.

    It has no patch embedding or positions of its own: callers embed, position and (for MAE) drop tokens first, so
    only the visible tokens are ever computed on.

    Args:
        embed_dim: token width (ViT-S 384, ViT-B 768).
        depth: number of blocks (12 for ViT-S/B).
        num_heads: attention heads (ViT-S 6, ViT-B 12).
        mlp_ratio: MLP inner width over ``embed_dim``.
        qkv_bias: bias on the ``qkv`` projections.
        drop_path_rate: stochastic depth of the last block; block ``i`` uses ``drop_path_rate * i / (depth - 1)``.
        grad_checkpointing: recompute each block in the backward pass instead of storing its activations.
        memory_slots: memory slots of every block's attention (see :class:`SelfAttention`; 0: plain attention).

    Raises:
        ValueError: when ``depth`` < 1, ``embed_dim`` is not a multiple of ``num_heads``, ``drop_path_rate`` is
            outside ``[0, 1)`` or ``memory_slots`` is negative.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        memory_slots: int = 0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        _check_width(embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rate, memory_slots=memory_slots)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.apply(init_transformer_weights)

    def forward(self, tokens: Tensor) -> Tensor:
        """Encode tokens.

        Args:
            tokens: ``[B, N, D]`` embedded, positioned tokens.

        Returns:
            ``[B, N, D]`` after the last block and the final norm.

        Raises:
            ValueError: when ``tokens`` is not ``[B, N, embed_dim]``.
        """
        return self.forward_features(tokens, ())[0]

    def forward_features(self, tokens: Tensor, layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """Encode tokens and keep the hidden states after some blocks (e.g. for UNETR-style decoders).

        Args:
            tokens: ``[B, N, D]``.
            layers: 0-based block indices whose outputs (before the final norm) to return, in the order given.

        Returns:
            The normed output ``[B, N, D]`` and one ``[B, N, D]`` per entry of ``layers``.

        Raises:
            ValueError: when ``tokens`` has the wrong shape or a layer index is out of range.
        """
        _check_tokens(tokens, self.embed_dim)
        wanted = [int(i) for i in layers]
        if any(not 0 <= i < len(self.blocks) for i in wanted):
            raise ValueError(f"layers {wanted} must be block indices in [0, {len(self.blocks)}).")
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        hidden: dict[int, Tensor] = {}
        x = tokens
        for index, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
            if index in wanted:
                hidden[index] = x
        return self.norm(x), [hidden[i] for i in wanted]


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear weights, zero biases, unit LayerNorm; use with ``Module.apply``.

    Args:
        module: any module; only ``nn.Linear`` and ``nn.LayerNorm`` are touched.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MultiViewEncoder(nn.Module):
    """Tokenise one or more image views and encode their (visible) tokens jointly with one shared ViT.

    Each view has its own patch embedding and fixed N-d sin-cos positions over its own patch grid, plus (optionally)
    a learnable per-view embedding that tells the shared encoder which view a token came from; the tokens of all
    views present are concatenated so attention runs across views, as in CineMA (Fu et al., 2025,
    https://arxiv.org/abs/2506.00679). Given masks, only the visible patches are embedded and encoded (MAE).

    Parameter names (stable, loaded strictly by fine-tuning code): ``patch_embed.<view>.*``, ``view_embed.<view>``
    and ``vit.*``; positions are buffers rebuilt from the view geometry and are not saved.

    Args:
        views: view name -> :class:`~medssl.nets.patch_embed.ViewSpec` or ``{"image_size", "patch_size",
            "in_channels"}``; names must be Python identifiers.
        embed_dim: token width.
        depth: ViT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP inner width over ``embed_dim``.
        qkv_bias: bias on the ``qkv`` projections.
        drop_path_rate: stochastic depth of the last block.
        patch_embed: ``"linear"`` or ``"conv_stem"`` (see :mod:`medssl.nets.patch_embed`).
        view_embedding: add a learnable embedding per view (CineMA's multi-view setting).
        grad_checkpointing: recompute ViT blocks in the backward pass.
        memory_slots: memory slots of every block's attention (see :class:`SelfAttention`; 0: plain attention).

    Raises:
        ValueError: when there is no view, a name is not an identifier, or a view's geometry is invalid (the message
            names the view).
    """

    def __init__(
        self,
        views: Mapping[str, ViewSpec | Mapping],
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        patch_embed: str = "linear",
        view_embedding: bool = True,
        grad_checkpointing: bool = False,
        memory_slots: int = 0,
    ) -> None:
        super().__init__()
        self.views = parse_views(views)
        self.embed_dim = embed_dim
        self.patch_embed = nn.ModuleDict(
            {
                name: build_patch_embed(patch_embed, spec.patch_size, spec.in_channels, embed_dim)
                for name, spec in self.views.items()
            }
        )
        self.view_embed = new_view_embeddings(self.views, embed_dim) if view_embedding else None
        self.positions = ViewPositions(self.views, embed_dim)
        self.vit = ViTEncoder(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, grad_checkpointing, memory_slots
        )

    def check_images(self, images: Mapping[str, Tensor]) -> int:
        """Validate view images against the view geometry (:func:`check_view_images`).

        Args:
            images: view name -> ``[B, C, *image_size]``; at least one view.

        Returns:
            The batch size ``B``.

        Raises:
            ValueError: see :func:`check_view_images`.
        """
        return check_view_images(self.views, images)

    def embed(
        self, images: Mapping[str, Tensor], masks: Mapping[str, MaskOutput] | None = None
    ) -> tuple[Tensor, dict[str, int]]:
        """Patchify, keep the visible patches, embed and position them, and concatenate the views.

        Args:
            images: view name -> ``[B, C, *image_size]``.
            masks: view name -> mask over that view's grid; views without a mask keep all tokens.

        Returns:
            Tokens ``[B, sum_v K_v, embed_dim]`` in the order of ``images``, and the token count ``K_v`` per view.

        Raises:
            ValueError: for invalid images (see :meth:`check_images`) or a mask that does not fit its view.
        """
        batch = self.check_images(images)
        tokens, counts = [], {}
        for name, image in images.items():
            patches = patchify(image, self.views[name].patch_size)
            position = self.positions(name)
            mask = None if masks is None else masks.get(name)
            if mask is not None:
                check_mask(name, mask, batch, self.views[name].num_tokens)
                patches, position = gather_tokens(patches, mask.ids_keep), position[mask.ids_keep]
            x = self.patch_embed[name](patches) + position
            if self.view_embed is not None:
                x = x + self.view_embed[name]
            tokens.append(x)
            counts[name] = x.shape[1]
        return (torch.cat(tokens, 1) if len(tokens) > 1 else tokens[0]), counts

    def forward(self, images: Mapping[str, Tensor], masks: Mapping[str, MaskOutput] | None = None) -> dict[str, Tensor]:
        """Encode the views jointly.

        Args:
            images: view name -> ``[B, C, *image_size]``; any subset of the views.
            masks: optional view name -> mask; masked tokens are dropped before embedding.

        Returns:
            View name -> ``[B, K_v, embed_dim]`` encoded tokens (``K_v = N_v`` without a mask), in grid order
            without a mask and in ``ids_keep`` order with one.

        Raises:
            ValueError: see :meth:`embed`.
        """
        tokens, counts = self.embed(images, masks)
        return dict(zip(counts, self.vit(tokens).split(list(counts.values()), dim=1)))


def check_view_images(views: Mapping[str, ViewSpec], images: Mapping[str, Tensor]) -> int:
    """Validate view images against view geometries.

    Args:
        views: view name -> geometry.
        images: view name -> ``[B, C, *image_size]``; at least one view.

    Returns:
        The batch size ``B``.

    Raises:
        ValueError: for an unknown view, a wrong number of axes, channels or spatial size, or batch sizes that
            differ between views (the message names the view and prints the shapes).
    """
    if not images:
        raise ValueError(f"no view images given; expected some of {list(views)}.")
    batch_sizes = {}
    for name, image in images.items():
        if name not in views:
            raise ValueError(f"unknown view {name!r}; this model has views {list(views)}.")
        spec = views[name]
        expected = (spec.in_channels, *spec.image_size)
        if image.ndim != 2 + len(spec.image_size) or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"view {name!r}: expected images [B, {', '.join(map(str, expected))}] "
                f"({len(spec.image_size)} spatial axes), got shape {tuple(image.shape)}."
            )
        batch_sizes[name] = image.shape[0]
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"views must share the batch size, got {batch_sizes}.")
    return next(iter(batch_sizes.values()))


def parse_views(views: Mapping[str, ViewSpec | Mapping]) -> dict[str, ViewSpec]:
    """Validate and normalise a view mapping.

    Args:
        views: view name -> :class:`ViewSpec` or its mapping form.

    Returns:
        An ordered ``{name: ViewSpec}``.

    Raises:
        ValueError: when empty, a name is not an identifier, or a view's geometry is invalid (naming the view).
    """
    if not views:
        raise ValueError("at least one view is needed.")
    parsed = {}
    for name, spec in views.items():
        if not str(name).isidentifier():
            raise ValueError(f"view names must be Python identifiers (they name parameters), got {name!r}.")
        try:
            parsed[name] = ViewSpec.of(spec)
        except (ValueError, TypeError) as error:
            raise ValueError(f"view {name!r}: {error}") from error
    return parsed


def new_view_embeddings(views: Mapping[str, ViewSpec], dim: int) -> nn.ParameterDict:
    """Learnable view embeddings, drawn from N(0, 0.02²) like MAE's learnable tokens.

    Args:
        views: view name -> geometry (only the names are used).
        dim: embedding width.

    Returns:
        View name -> ``[1, 1, dim]`` parameter, added to every token of that view.
    """
    return nn.ParameterDict({name: nn.Parameter(torch.randn(1, 1, dim) * 0.02) for name in views})


class ViewPositions(nn.Module):
    """Fixed sin-cos positions per view (non-persistent buffers: rebuilt from the geometry, never saved).

    Args:
        views: view name -> geometry.
        dim: embedding width.
    """

    def __init__(self, views: Mapping[str, ViewSpec], dim: int) -> None:
        super().__init__()
        for name, spec in views.items():
            self.register_buffer(name, sincos_pos_embed(spec.grid, dim), persistent=False)

    def forward(self, name: str) -> Tensor:
        """Args: name: a view name. Returns: its ``[N_v, dim]`` positions in grid order."""
        return self.get_buffer(name)


def check_mask(name: str, mask: MaskOutput, batch: int, num_tokens: int) -> None:
    """Check that a mask fits a view's batch and grid.

    Args:
        name: the view, for the message.
        mask: the mask.
        batch: expected batch size.
        num_tokens: tokens on the view's grid.

    Raises:
        ValueError: when ``ids_restore`` is not ``[batch, num_tokens]`` or ``ids_keep`` is not ``[batch, K]`` with
            ``K <= num_tokens``.
    """
    keep, restore = mask.ids_keep, mask.ids_restore
    if restore.shape != (batch, num_tokens) or keep.ndim != 2 or keep.shape[0] != batch or keep.shape[1] > num_tokens:
        raise ValueError(
            f"view {name!r}: mask does not fit batch {batch} and {num_tokens} tokens: ids_keep "
            f"{tuple(keep.shape)}, ids_restore {tuple(restore.shape)}."
        )

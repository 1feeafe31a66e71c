"""MAE pre-training step throughput: medssl's ``MaskedAutoencoder`` against MONAI's ``MaskedAutoEncoderViT``.

One training step is forward + masked-MSE loss + backward + AdamW step (fused, as medssl's bundles run it, for
every model), with the same width, depth, heads, MLP width, decoder, patch size and mask ratio for every model.
Peers, measured in the same run with interleaved rounds:

- MONAI as shipped (einsum attention that materialises the attention matrix);
- MONAI with PyTorch's fused attention switched on (``use_flash_attention`` set on every ``SABlock``;
  ``MaskedAutoEncoderViT`` has no constructor argument for it in MONAI 1.6);
- 2048 x 2048 float32 matrix products, the peak for model-FLOP utilisation (MFU): FLOPs of medssl's step counted
  by ``torch.utils.flop_counter.FlopCounterMode`` / step time / matmul FLOP rate. ``torch.mm`` goes to MKL, which
  runs AVX2 code on AMD CPUs, so the oneDNN product (AVX-512, what medssl's linear layers use there) is timed too:
  ``mfu`` is against the faster of the two (the machine's real peak), ``mfu_vs_torch_mm`` against ``torch.mm``.

Two scales: CineMA's SAX (192x192x16, 16x16x1 patches = 2304 tokens; ViT 384 x 12 with 6 heads, decoder 192 x 4,
mask 0.75) and a small 3D volume (96^3, 16^3 patches = 216 tokens, same model). Then medssl under bf16 autocast and
a short fp32-vs-bf16 loss curve (same seed, same batch, same masks).

Run: ``python benchmarks/mae_pretrain.py [--device cuda] [--bf16] [--quick] [--steps N] [--warmup N]``. The last
line of output is one JSON object with the figures (ratios > 1 mean medssl is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import MaskedAutoEncoderViT
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from medssl.methods import MaskedAutoencoder
from medssl.nets.vit import OneDNNLinear, onednn_matmul
from medssl.nets.tokens import patchify
from medssl.objectives import masked_reconstruction_loss


@dataclass(frozen=True)
class Scale:
    """One benchmark configuration."""

    name: str
    image_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch: int
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    decoder_dim: int = 192
    decoder_depth: int = 4
    decoder_num_heads: int = 3
    mask_ratio: float = 0.75


FULL_SCALES = (
    Scale("cinema", (192, 192, 16), (16, 16, 1), batch=2),
    Scale("small", (96, 96, 96), (16, 16, 16), batch=4),
)
TINY_MODEL = dict(embed_dim=48, depth=2, num_heads=2, decoder_dim=24, decoder_depth=1, decoder_num_heads=2)
QUICK_SCALES = (
    Scale("cinema", (32, 32, 4), (8, 8, 1), batch=1, **TINY_MODEL),
    Scale("small", (32, 32, 32), (16, 16, 16), batch=1, **TINY_MODEL),
)


def build_medssl(scale: Scale) -> MaskedAutoencoder:
    """medssl's MAE at a scale."""
    return MaskedAutoencoder(
        scale.image_size,
        scale.patch_size,
        embed_dim=scale.embed_dim,
        depth=scale.depth,
        num_heads=scale.num_heads,
        decoder_dim=scale.decoder_dim,
        decoder_depth=scale.decoder_depth,
        decoder_num_heads=scale.decoder_num_heads,
        mask_ratio=scale.mask_ratio,
    )


def build_monai(scale: Scale, fused_attention: bool) -> MaskedAutoEncoderViT:
    """MONAI's MAE with the same shapes; ``fused_attention`` switches its SABlocks to SDPA."""
    model = MaskedAutoEncoderViT(
        in_channels=1,
        img_size=scale.image_size,
        patch_size=scale.patch_size,
        hidden_size=scale.embed_dim,
        mlp_dim=4 * scale.embed_dim,
        num_layers=scale.depth,
        num_heads=scale.num_heads,
        masking_ratio=scale.mask_ratio,
        decoder_hidden_size=scale.decoder_dim,
        decoder_mlp_dim=4 * scale.decoder_dim,
        decoder_num_layers=scale.decoder_depth,
        decoder_num_heads=scale.decoder_num_heads,
        qkv_bias=True,
        spatial_dims=len(scale.image_size),
    )
    for module in model.modules():
        if isinstance(module, SABlock):
            module.use_flash_attention = fused_attention
    return model


def medssl_loss(model: MaskedAutoencoder, images: torch.Tensor) -> torch.Tensor:
    return model({"image": images})["loss"]


def monai_loss(model: MaskedAutoEncoderViT, images: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    pred, mask = model(images)
    return masked_reconstruction_loss(pred.float(), patchify(images, patch_size), mask.bool())


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class Trainer:
    """One model, its optimiser and a fixed batch; ``step()`` runs one training step."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, images: torch.Tensor, bf16: bool) -> None:
        self.model, self.loss_fn, self.images, self.bf16 = model, loss_fn, images, bf16
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True
        )

    def step(self) -> float:
        with autocast(self.images.device, self.bf16):
            loss = self.loss_fn(self.model, self.images)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    runners: dict[str, Callable[[], object]], steps: int, warmup: int, rounds: int, device: torch.device
) -> dict[str, float]:
    """Seconds per call of each runner: the best of ``rounds`` interleaved rounds of ``steps`` calls each.

    Interleaving exposes every runner to the same machine state; taking the best round (as ``timeit`` does) discards
    rounds slowed by other processes, which on a shared machine only ever add time.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                run()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / steps)
    spread = {name: f"{min(v):.3g}..{max(v):.3g}" for name, v in samples.items()}
    print(f"seconds per call, best..worst round: {spread}", file=sys.stderr, flush=True)
    return {name: min(values) for name, values in samples.items()}


def matmul_runners(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """2048^3 matrix products through every float32 path PyTorch has on this device: ``torch.mm`` (the BLAS; oneDNN
    for bf16) and, on CPU in float32, oneDNN (which medssl's linear layers use where MKL lacks AVX-512), so the peak
    is the machine's best."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    runners: dict[str, Callable[[], object]] = {"mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        runners["onednn"] = lambda: onednn_matmul(a, b)
    return runners


MATMUL_FLOPS = 2.0 * 2048**3


def count_step_flops(trainer: Trainer) -> float:
    """FLOPs of one forward + backward. The counter sees aten matmuls only, so attention runs through the math kernel
    and linear layers through ``F.linear`` while counting (same arithmetic, different kernels)."""
    counter = FlopCounterMode(display=False)
    enabled, OneDNNLinear.enabled = OneDNNLinear.enabled, False
    try:
        with counter, sdpa_kernel(SDPBackend.MATH), autocast(trainer.images.device, trainer.bf16):
            trainer.loss_fn(trainer.model, trainer.images).backward()
    finally:
        OneDNNLinear.enabled = enabled
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def smooth_volume(batch: int, size: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    """Low-pass random images in [0, 1]: learnable structure, unlike white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, *(max(2, s // 8) for s in size), generator=generator)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(coarse, size=size, mode=mode, align_corners=False).to(device)


def benchmark_scale(scale: Scale, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    images = smooth_volume(scale.batch, scale.image_size, device, seed=0)

    def monai_trainer(fused_attention: bool) -> Trainer:
        # MONAI peers always run in float32: MONAI 1.6's MaskedAutoEncoderViT fails under bf16 autocast (its masking
        # writes bf16 tokens into a float32 buffer with index_put), so under --bf16 the ratios are medssl bf16 vs
        # MONAI fp32, the comparison a user switching to medssl would see.
        model = build_monai(scale, fused_attention).to(device)
        return Trainer(model, lambda m, x: monai_loss(m, x, scale.patch_size), images, bf16=False)

    trainers = {
        "medssl": Trainer(build_medssl(scale).to(device), medssl_loss, images, args.bf16),
        "monai": monai_trainer(False),
        "monai_sdpa": monai_trainer(True),
    }
    runners: dict[str, Callable[[], object]] = {name: trainer.step for name, trainer in trainers.items()}
    bf16_on_top = not args.bf16 and (device.type == "cuda" or torch.backends.mkldnn.is_available())
    if bf16_on_top:
        trainers["medssl_bf16"] = Trainer(trainers["medssl"].model, medssl_loss, images, bf16=True)
        runners["medssl_bf16"] = trainers["medssl_bf16"].step
    main_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peaks = {f"matmul_{name}": run for name, run in matmul_runners(device, main_dtype).items()}
    if bf16_on_top:
        peaks.update({f"matmul_bf16_{name}": run for name, run in matmul_runners(device, torch.bfloat16).items()})
    times = time_interleaved({**runners, **peaks}, args.steps, args.warmup, args.rounds, device)
    flops = count_step_flops(trainers["medssl"])
    peak = {name: MATMUL_FLOPS / times[name] for name in peaks}
    best = max(rate for name, rate in peak.items() if not name.startswith("matmul_bf16"))
    achieved = flops / times["medssl"]
    figures = {
        "step_s_medssl": times["medssl"],
        "step_s_monai": times["monai"],
        "step_s_monai_sdpa": times["monai_sdpa"],
        "speedup_vs_monai": times["monai"] / times["medssl"],
        "speedup_vs_monai_sdpa": times["monai_sdpa"] / times["medssl"],
        "step_gflop": flops / 1e9,
        **{f"peak_gflops_{name[len('matmul_'):]}": rate / 1e9 for name, rate in peak.items()},
        "mfu": achieved / best,
        "mfu_vs_torch_mm": achieved / peak["matmul_mm"],
    }
    if bf16_on_top:
        best_bf16 = max(rate for name, rate in peak.items() if name.startswith("matmul_bf16"))
        figures.update(
            {
                "step_s_medssl_bf16": times["medssl_bf16"],
                "speedup_bf16_vs_monai_sdpa": times["monai_sdpa"] / times["medssl_bf16"],
                "mfu_bf16": flops / times["medssl_bf16"] / best_bf16,
            }
        )
    return figures


def loss_curves(scale: Scale, device: torch.device, steps: int) -> dict[str, float]:
    """fp32 and bf16 losses over ``steps`` steps from the same initial weights, batch and mask seeds."""
    images = smooth_volume(scale.batch, scale.image_size, device, seed=1)
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(build_medssl(scale).to(device), medssl_loss, images, bf16)
        trainer.optimizer.param_groups[0]["lr"] = 1e-3
        curve = []
        for step in range(steps):
            generator = torch.Generator(device=device).manual_seed(step)
            trainer.loss_fn = lambda m, x, g=generator: m({"image": x}, generator=g)["loss"]
            curve.append(trainer.step())
        curves[bf16] = curve
    fp32, bf16 = curves[False], curves[True]
    # Step-to-step jitter of the fp32 curve (masks change every step) is the noise a precision change must stay in.
    noise = statistics.pstdev(b - a for a, b in zip(fp32, fp32[1:])) if steps > 2 else float("nan")
    gap = max(abs(a - b) for a, b in zip(fp32, bf16))
    return {
        "loss_fp32_first": fp32[0],
        "loss_fp32_last": fp32[-1],
        "loss_bf16_last": bf16[-1],
        "loss_curve_max_abs_gap": gap,
        "loss_curve_step_noise": noise,
        "bf16_loss_within_noise": bool(gap <= 2 * noise) if math.isfinite(noise) else False,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--bf16", action="store_true", help="run medssl under bf16 autocast (GPU practice); MONAI's peers stay fp32"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps, for a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model before timing")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--curve-steps", type=int, default=None, help="steps of the fp32-vs-bf16 loss curve")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    defaults = (1, 1, 1, 4) if args.quick else (2, 2, 5, 30)
    for name, value in zip(("steps", "warmup", "rounds", "curve_steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scales = QUICK_SCALES if args.quick else FULL_SCALES
    results: dict[str, float] = {
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "monai_precision": "fp32",
        "device": str(device),
    }
    for scale in scales:
        figures = benchmark_scale(scale, device, args)
        print(f"{scale.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), file=sys.stderr, flush=True)
        prefix = "" if scale.name == "cinema" else f"{scale.name}_"
        results.update({prefix + key: value for key, value in figures.items()})
    results.update(loss_curves(scales[1], device, args.curve_steps))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

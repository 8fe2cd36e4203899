"""Masked-autoencoder pretraining of a timm ViT on face images (He et al. 2021, arXiv:2111.06377).

    python -m abaw.pretrain mae --images DIR [DIR ...] --backbone vit_base_patch16_224 --out runs/mae

* Encoder: ``timm.create_model(backbone, pretrained=False, num_classes=0)`` (optionally ``--init``
  local weights). It sees only the visible 25 % of the patches: per sample, a random shuffle of the
  patches (uniform noise, argsort) keeps the first ``(1 - mask_ratio) N``; the class (and register)
  tokens are always kept.
* Decoder: the paper's ViT-B decoder is 8 blocks of width 512 with 16 heads (head width 32), with
  fixed 2-D sine-cosine position embeddings and a shared learned mask token. For encoders narrower
  than ViT-B (width < 768) or shallower (< 12 blocks) the decoder is scaled down proportionally:
  width ``512 * w / 768`` rounded to a multiple of 32 (at least 32), heads = width / 32, depth
  ``round(8 * depth / 12)`` (at least 1); ViT-B, -L and -H get the paper's 8 x 512 x 16.
  (The tiny test backbone ``test_vit``, width 64 and 6 blocks, gets 4 blocks of width 32, 1 head.)
* Loss: mean squared error on normalised pixels (each target patch minus its mean over its own
  pixels, divided by its standard deviation, ``norm_pix_loss``), averaged over the masked patches only.
* Optimiser: AdamW (betas 0.9, 0.95, weight decay 0.05, none on biases, norms, tokens and position
  embeddings), base rate ``blr * batch / 256`` (MAE's rule, blr 1.5e-4), linear warm-up then cosine
  decay per step; bf16 autocast on CUDA, float32 on the CPU. Augmentation: random horizontal flips.
* Images: every .jpg/.jpeg/.png under the ``--images`` folders, any size, whole image resized to the
  model's input size (a face crop is already framed; MAE's random resized crop would cut it).
* Output in ``--out``: ``last.pt`` (resume point, every ``--save-every`` steps and at the end),
  ``history.csv`` (step, loss, lr), ``previews/step_<n>.png`` (masked input, reconstruction,
  original, every ``--preview-every`` steps) and ``encoder.pth`` (the encoder alone, timm key names).
  A rerun resumes from ``last.pt`` (weights, optimizer, scheduler, random streams, step): the batches
  of an epoch are a seeded permutation, so the resumed run continues exactly the unbroken one.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..console import console
from ..io import atomic_path, atomic_torch_save, atomic_write_text
from .common import (Images, Normalise, PretrainError, batch_loader, check_resume, create_encoder, data_config,
                     epoch_batches, find_images, load_init, progress, random_flip, read_resume_point, restore_rng,
                     rng_state, save_encoder, warmup_cosine)

# The paper's decoder for ViT-B/L/H (Table 1 and its appendix A.1).
DECODER_DEPTH, DECODER_WIDTH, DECODER_HEADS = 8, 512, 16
VIT_B_WIDTH, VIT_B_DEPTH = 768, 12


def decoder_size(width: int, depth: int) -> tuple[int, int, int]:
    """(depth, width, heads) of the decoder for an encoder of ``width`` and ``depth`` (see the module doc)."""
    head_width = DECODER_WIDTH // DECODER_HEADS
    dec_width = DECODER_WIDTH if width >= VIT_B_WIDTH else max(
        head_width, head_width * round(DECODER_WIDTH * width / VIT_B_WIDTH / head_width))
    dec_depth = DECODER_DEPTH if depth >= VIT_B_DEPTH else max(1, round(DECODER_DEPTH * depth / VIT_B_DEPTH))
    return dec_depth, dec_width, dec_width // head_width


def sincos_2d(width: int, grid: tuple[int, int]):
    """MAE's fixed 2-D sine-cosine position embedding, (H*W, width): half the channels for each axis."""
    import torch

    if width % 4:
        raise PretrainError(f"decoder width {width} must be a multiple of 4 for 2-D sine-cosine embeddings")
    gy, gx = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij")

    def one_axis(pos):
        omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(gx), one_axis(gy)], axis=1)).float()


def _make_mae_class():
    import torch
    from timm.models.vision_transformer import Block
    from torch import nn

    class MaskedAutoencoder(nn.Module):
        """A timm ViT ``encoder`` plus an MAE decoder; ``forward`` returns (loss, prediction, mask)."""

        def __init__(self, encoder, mask_ratio: float = 0.75, decoder=None):
            super().__init__()
            for needed in ("patch_embed", "_pos_embed", "blocks", "norm"):
                if not hasattr(encoder, needed):
                    raise PretrainError(f"the backbone {type(encoder).__name__} is not a timm VisionTransformer "
                                        f"(no {needed}): MAE needs patch tokens")
            if not 0 < mask_ratio < 1:
                raise PretrainError(f"--mask-ratio must be between 0 and 1, got {mask_ratio}")
            self.encoder, self.mask_ratio = encoder, mask_ratio
            self.patch = encoder.patch_embed.patch_size[0]
            self.grid = tuple(encoder.patch_embed.grid_size)
            self.prefix = getattr(encoder, "num_prefix_tokens", 0)
            width = encoder.embed_dim
            depth, dec_width, heads = decoder or decoder_size(width, len(encoder.blocks))
            self.decoder_shape = (depth, dec_width, heads)
            self.decoder_embed = nn.Linear(width, dec_width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
            self.register_buffer("decoder_pos_embed", sincos_2d(dec_width, self.grid)[None], persistent=False)
            self.decoder_prefix_pos = nn.Parameter(torch.zeros(1, self.prefix, dec_width))
            self.decoder_blocks = nn.ModuleList(Block(dec_width, heads, mlp_ratio=4.0, qkv_bias=True)
                                                for _ in range(depth))
            self.decoder_norm = nn.LayerNorm(dec_width)
            self.decoder_pred = nn.Linear(dec_width, self.patch ** 2 * 3)
            nn.init.normal_(self.mask_token, std=0.02)
            for module in [self.decoder_embed, *self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
                module.apply(_init_weights)

        def patchify(self, images):
            """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major order, pixels (row, col, channel)."""
            b, c, _, _ = images.shape
            p, (gh, gw) = self.patch, self.grid
            x = images.reshape(b, c, gh, p, gw, p)  # permute, not einsum: autocast would round einsum to bf16
            return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)

        def unpatchify(self, patches):
            b = patches.shape[0]
            p, (gh, gw) = self.patch, self.grid
            x = patches.reshape(b, gh, gw, p, p, 3)
            return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, gh * p, gw * p)

        def encode(self, images):
            """The visible patches through the encoder: (tokens, mask (B, N) 1 = hidden, restore order)."""
            enc = self.encoder
            x = enc._pos_embed(enc.patch_embed(images))  # timm adds the prefix tokens and position embeddings
            prefix, x = x[:, :self.prefix], x[:, self.prefix:]
            b, n, d = x.shape
            keep = max(1, int(n * (1 - self.mask_ratio)))
            noise = torch.rand(b, n, device=x.device)  # per-sample random shuffle
            shuffle = torch.argsort(noise, dim=1)
            restore = torch.argsort(shuffle, dim=1)
            kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
            mask = torch.ones(b, n, device=x.device)
            mask[:, :keep] = 0
            mask = torch.gather(mask, 1, restore)
            x = torch.cat([prefix, kept], dim=1)
            x = enc.norm_pre(x) if hasattr(enc, "norm_pre") else x
            for block in enc.blocks:
                x = block(x)
            return enc.norm(x), mask, restore

        def decode(self, tokens, restore):
            x = self.decoder_embed(tokens)
            prefix, kept = x[:, :self.prefix], x[:, self.prefix:]
            b, n = restore.shape
            masks = self.mask_token.expand(b, n - kept.shape[1], -1)
            patches = torch.cat([kept, masks], dim=1)
            patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, patches.shape[2]))
            x = torch.cat([prefix + self.decoder_prefix_pos, patches + self.decoder_pos_embed], dim=1)
            for block in self.decoder_blocks:
                x = block(x)
            return self.decoder_pred(self.decoder_norm(x))[:, self.prefix:]

        def loss(self, images, prediction, mask):
            target = self.patchify(images.float())
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
            per_patch = ((prediction.float() - target) ** 2).mean(dim=-1)
            return (per_patch * mask).sum() / mask.sum()

        def forward(self, images):
            tokens, mask, restore = self.encode(images)
            prediction = self.decode(tokens, restore)
            return self.loss(images, prediction, mask), prediction, mask

    return MaskedAutoencoder


def _init_weights(module) -> None:
    from torch import nn

    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_mae(encoder, mask_ratio: float = 0.75, decoder=None):
    return _make_mae_class()(encoder, mask_ratio, decoder)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, tokens or position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.endswith(("cls_token", "reg_token", "pos_embed", "mask_token", "_pos"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class MAEOptions:
    images: list[str]
    backbone: str
    out: str
    init: str | None = None
    epochs: int = 100
    steps: int | None = None  # total steps; overrides --epochs
    max_steps: int | None = None  # stop (resumably) after this many steps in total: a planned interruption
    batch_size: int = 64
    blr: float = 1.5e-4
    lr: float | None = None  # absolute; default blr * batch / 256
    warmup_steps: int | None = None  # default: 5 % of the steps (40 of MAE's 800 epochs)
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    save_every: int = 500
    preview_every: int = 1000
    log_every: int = 50


@dataclass
class MAEResult:
    out: Path
    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # of the steps this call ran
    resumed_from: int = 0
    complete: bool = False


def train_mae(options: MAEOptions) -> MAEResult:
    """Pretrain (or resume) and write ``OUT/encoder.pth``; see the module doc."""
    import torch

    from ..extract.frames import torch_device

    o = options
    for name in ("batch_size", "epochs", "save_every", "preview_every", "log_every"):
        if getattr(o, name) < 1:
            raise PretrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    out = Path(o.out)
    paths = find_images(o.images)
    device, autocast = torch_device(o.device)
    torch.manual_seed(o.seed)
    encoder = create_encoder(o.backbone)
    config = data_config(encoder)
    dataset = Images(paths, config["input_size"][1:], config.get("interpolation", "bicubic"))
    per_epoch = len(epoch_batches(len(paths), o.batch_size, o.seed, 0))
    total = o.steps if o.steps is not None else o.epochs * per_epoch
    if total < 1:
        raise PretrainError(f"--steps must be at least 1, got {total}")
    warmup = o.warmup_steps if o.warmup_steps is not None else max(1, round(0.05 * total))
    lr = o.lr if o.lr is not None else o.blr * o.batch_size / 256
    settings = {"backbone": o.backbone, "images": len(paths), "batch_size": o.batch_size, "total_steps": total,
                "lr": lr, "warmup_steps": warmup, "mask_ratio": o.mask_ratio, "seed": o.seed}

    saved = read_resume_point(out, device, "mae")
    resume = saved is not None
    if o.init and not resume:
        load_init(encoder, o.init, o.backbone)
    model = build_mae(encoder, o.mask_ratio).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    step, history = 0, []
    if resume:
        check_resume(saved["settings"], settings, out)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved, device)
        step, history = saved["step"], saved["history"]
        console.print(f"mae: resuming {out} at step {step} of {total}", markup=False)
    else:
        depth, width, heads = model.decoder_shape
        console.print(f"mae: {o.backbone} on {len(paths)} images, {total} steps of {o.batch_size} "
                      f"({per_epoch} per epoch), lr {lr:.2e}, decoder {depth} blocks x {width} wide, {heads} heads, "
                      f"device {device}", markup=False)
    result = MAEResult(out, step, total, resumed_from=step)
    normalise = Normalise(config, device)
    stop = total if o.max_steps is None else min(total, o.max_steps)

    def save() -> None:
        atomic_torch_save(out / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "scheduler": scheduler.state_dict(), "step": step, "history": history,
                                            "settings": settings, "options": asdict(o), **rng_state(device)})
        atomic_write_text(out / "history.csv", "step,loss,lr\n" + "".join(
            f"{h['step']},{h['loss']:.6f},{h['lr']:.6e}\n" for h in history))
        save_encoder(out / "encoder.pth", model.encoder)

    model.train()
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("mae", total=total, completed=step, info="")
        while step < stop:
            epoch, offset = divmod(step, per_epoch)
            batches = epoch_batches(len(paths), o.batch_size, o.seed, epoch)[offset:]
            batches = batches[:stop - step]
            for images, _ in batch_loader(dataset, batches, o.workers, device):
                x = normalise(random_flip(images))
                with autocast:
                    loss, prediction, mask = model(x)
                if not torch.isfinite(loss):
                    raise PretrainError(f"mae: the loss is {loss.item()} at step {step + 1}; lower --blr/--lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                value = float(loss.detach())
                result.losses.append(value)
                history.append({"step": step, "loss": value, "lr": optimizer.param_groups[0]["lr"]})
                rate = (step - result.resumed_from) * o.batch_size / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=step, info=f"loss {value:.4f}, {rate:,.0f} img/s")
                if not console.is_terminal and (step % o.log_every == 0 or step == stop):
                    console.print(f"mae: step {step}/{total} loss {value:.4f} ({rate:,.0f} img/s)", markup=False)
                if step % o.preview_every == 0:
                    write_preview(out / "previews" / f"step_{step:07d}.png", model, x, prediction, mask, config)
                if step % o.save_every == 0 and step < stop:
                    save()
    save()
    result.step = step
    result.complete = step >= total
    console.print(f"mae: {'done' if result.complete else 'stopped'} at step {step} of {total}; "
                  f"encoder weights in {out / 'encoder.pth'}", markup=False)
    return result


def write_preview(path: Path, model, x, prediction, mask, config: dict, n: int = 4) -> None:
    """A PNG grid: for up to ``n`` images of the batch, the masked input, the reconstruction (visible
    patches pasted back) and the original. The normalised-pixel prediction is mapped back to pixels with
    each target patch's own mean and standard deviation, as the MAE paper's figures do."""
    import torch
    from matplotlib.figure import Figure

    with torch.no_grad():
        x, prediction, mask = x[:n].float(), prediction[:n].float(), mask[:n]
        target = model.patchify(x)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pixels = prediction * (var + 1e-6) ** 0.5 + mean
        hidden = mask[:, :, None]
        masked = model.unpatchify(target * (1 - hidden))
        pasted = model.unpatchify(target * (1 - hidden) + pixels * hidden)
        mean_rgb = torch.tensor(config["mean"], device=x.device).view(1, 3, 1, 1)
        std_rgb = torch.tensor(config["std"], device=x.device).view(1, 3, 1, 1)
        rows = [((im * std_rgb + mean_rgb).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
                for im in (masked, pasted, x)]
    count = x.shape[0]
    figure = Figure(figsize=(3 * 2, count * 2), dpi=80)
    axes = figure.subplots(count, 3, squeeze=False)
    for i in range(count):
        for j, (title, images) in enumerate(zip(("masked", "reconstruction", "original"), rows)):
            axes[i][j].imshow(images[i])
            axes[i][j].set_axis_off()
            if i == 0:
                axes[i][j].set_title(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")

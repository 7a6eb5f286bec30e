"""Pretraining of the embedded models on the procedural shapes domain, on CPU.

Order (``train_sd``): render the data set → train the VAE (a norm-free ``AutoencoderTiny``, deterministic
latents with a small L2 penalty that keeps them inside the decoder's tanh range, shape pixels weighted
``1 + vae_shape_weight`` in the L1 + squared reconstruction loss) on whole images (``vae_crop`` < 64 trains on
crops) → encode every image once and set ``scaling_factor`` = 1/std of those latents (SD's convention) →
train UNet and text encoder jointly on the latents with the ε-prediction loss and 10 % empty prompts
(classifier-free guidance dropout), keeping an EMA of both for the saved weights.
``train_tinyclip`` trains the contrastive model independently on the same images.

Everything is seeded (numpy generator for data, torch generators for batches, noise and init), so a
rerun with the same settings and thread count writes the same weights.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write_json
from . import data as shapes
from . import models
from .tokenizer import load_clip_tokenizer, write_clip_tokenizer


@dataclass
class PretrainConfig:
    seed: int = 0
    n_images: int = 8000
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 2e-3
    # mean squared latent penalty: AutoencoderTiny's decoder squashes latents with 3·tanh(z/3), and
    # unpenalised latents drifted to std 60 in one measured run (saturated, near-binary codes)
    vae_latent_weight: float = 1e-3
    # shape pixels weigh 1 + w in the reconstruction loss (embedded/README.md: w 0 drew every shape in
    # the average shape colour)
    vae_shape_weight: float = 5.0
    # outline pixels weigh another w (measured: 0 → reconstructed shape accuracy 0.48, 5 → 0.80)
    vae_edge_weight: float = 5.0
    decoder_steps: int = 1000
    decoder_lr: float = 1e-3
    decoder_shape_weight: float = 4.0
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    cfg_dropout: float = 0.1
    ema_decay: float = 0.995
    clip_steps: int = 1000
    clip_batch: int = 64
    clip_lr: float = 2e-3
    fp16_storage: bool = True

    @classmethod
    def quick(cls) -> "PretrainConfig":
        """A few steps of everything on a small data set: seconds, for the test suite."""
        return cls(n_images=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=8, decoder_steps=2, clip_steps=2, clip_batch=8)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=5.0, leave=True)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _tokenizer(cache_dir: str = None):
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"nemo_aligner_draft_clip_tokenizer_{models.MAX_TOKENS}")
    return load_clip_tokenizer(cache_dir, model_max_length=models.MAX_TOKENS)


def _token_ids(tokenizer, captions: List[str]):
    enc = tokenizer(captions, padding="max_length", max_length=models.MAX_TOKENS, truncation=True,
                    return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def _images_to_model_range(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → ``[N, 3, H, W]`` in [−1, 1] (the VAE's range)."""
    return shapes.to_tensor(images_u8) * 2 - 1


def _index_of(captions: List[str], unique: List[str]) -> torch.Tensor:
    where = {c: i for i, c in enumerate(unique)}
    return torch.tensor([where[c] for c in captions])


def _load_as_float32(model_dir: str) -> None:
    """transformers loads a model in the ``dtype`` its config.json records, which ``save_pretrained`` sets to
    the storage dtype (float16 here). diffusers loads the UNet and VAE in float32 whatever they are stored
    in, so a float16 text encoder next to them breaks a plain ``DiffusionPipeline.from_pretrained(dir)``
    (Half and Float in one matmul). Record float32: the weights stay float16 on disk and are upcast on load."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    atomic_write_json(path, config, indent=2, sort_keys=True)


def _compact_tokenizer(directory: str) -> None:
    """Replace transformers' 3.6 MB ``tokenizer.json`` by the equivalent vocab.json + merges.txt (1.5 MB):
    the same CLIP BPE, read by ``CLIPTokenizer.from_pretrained``, and it keeps the shipped set small."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    write_clip_tokenizer(directory, model_max_length=models.MAX_TOKENS)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- VAE
def _edge_mask(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]``: 1 where a pixel's colour differs from one of its 4 neighbours (a shape outline)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    neighbours = [p[:, :, :h, 1:w + 1], p[:, :, 2:, 1:w + 1], p[:, :, 1:h + 1, :w], p[:, :, 1:h + 1, 2:]]
    return torch.stack([(n != x).any(dim=1) for n in neighbours]).any(dim=0)[:, None].float()


def _weighted_rec_loss(recon: torch.Tensor, x: torch.Tensor, shape_weight: float,
                       edge_weight: float = 0.0) -> torch.Tensor:
    """L1 + squared error per pixel, normalised by the mean weight. Pixels that differ from the corner
    (background) colour weigh ``1 + shape_weight``; outline pixels (a 4-neighbour of another colour)
    another ``edge_weight`` on top. ``recon``, ``x``: ``[B, 3, H, W]`` in [−1, 1].

    Why: the shapes cover a few percent of the pixels, so with uniform weights the cheapest solution
    is to draw every shape in the average shape colour (measured: the unweighted VAE did exactly
    that, shape colour right 11 % of the time in reconstructions); and blurred outlines turn squares
    into circles for the checker.
    """
    weight = 1.0 + shape_weight * (x != x[:, :, :1, :1]).any(dim=1, keepdim=True).float()
    if edge_weight:
        weight = weight + edge_weight * _edge_mask(x)
    return (weight * ((recon - x).abs() + (recon - x) ** 2)).mean() / weight.mean()


def train_vae(images_u8: np.ndarray, cfg: PretrainConfig, log: Dict) -> torch.nn.Module:
    torch.manual_seed(cfg.seed + 1)
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    n, size, crop = len(images_u8), images_u8.shape[1], cfg.vae_crop
    # Crops start on the 8-pixel latent grid, so each crop sees whole latent cells.
    offsets = torch.arange(0, size - crop + 1, 8)
    bar = _progress(cfg.vae_steps, "VAE")
    t0 = time.time()
    for step in range(cfg.vae_steps):
        idx = torch.randint(n, (cfg.vae_batch,), generator=gen)
        ox, oy = offsets[torch.randint(len(offsets), (2,), generator=gen)].tolist()
        x = _images_to_model_range(images_u8[idx.numpy(), oy:oy + crop, ox:ox + crop])
        z = vae_latents(vae, x)
        recon = vae.decode(z).sample
        rec = _weighted_rec_loss(recon, x, cfg.vae_shape_weight, cfg.vae_edge_weight)
        loss = rec + cfg.vae_latent_weight * z.pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, min(100, cfg.vae_steps // 10 + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}")
    bar.close()
    log["vae"] = {"steps": cfg.vae_steps, "seconds": round(time.time() - t0, 1), "final_rec_loss": rec.item(),
                  "params": _count(vae), "class": type(vae).__name__}
    return vae.eval()


def vae_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of images ``x`` in [−1, 1]: ``AutoencoderTiny``'s deterministic code, or the
    posterior mean of an ``AutoencoderKL``."""
    out = vae.encode(x)
    return out.latents if hasattr(out, "latents") else out.latent_dist.mean


@torch.no_grad()
def encode_latents(vae, images_u8: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Latents ``[N, 4, 8, 8]`` (unscaled)."""
    out = [vae_latents(vae, _images_to_model_range(images_u8[i:i + batch])) for i in range(0, len(images_u8), batch)]
    return torch.cat(out)


@torch.no_grad()
def reconstruction_accuracy(vae, seed: int, n: int = 96) -> Dict[str, float]:
    """Checker accuracy of the VAE's reconstructions of ``n`` held-out renders: an upper bound on what the
    diffusion model can show through this VAE."""
    from . import checker

    images, captions = shapes.make_dataset(n, seed, "heldout")
    recon = vae.decode(vae_latents(vae, _images_to_model_range(images))).sample
    acc = checker.accuracy(list(((recon.clamp(-1, 1) + 1) / 2)), captions)
    return {k: round(v, 3) for k, v in acc.items()}


# --------------------------------------------------------------------------------------- UNet + text
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1.0 - decay)


def train_unet(latents: torch.Tensor, captions: List[str], tokenizer, cfg: PretrainConfig, log: Dict):
    """Joint UNet + text-encoder training on scaled latents ``[N, 4, 8, 8]``; returns the EMA copies."""
    torch.manual_seed(cfg.seed + 2)
    unet, text_encoder = models.build_unet(), models.build_text_encoder()
    scheduler = models.build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.float()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)

    unique = sorted(set(captions))
    caption_index = _index_of(captions, unique)
    ids_unique, _ = _token_ids(tokenizer, unique)
    empty_ids, _ = _token_ids(tokenizer, [""])
    gen = torch.Generator().manual_seed(cfg.seed + 12)
    n = len(latents)
    bar = _progress(cfg.unet_steps, "UNet")
    t0 = time.time()
    for step in range(cfg.unet_steps):
        idx = torch.randint(n, (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        ids = ids_unique[caption_index[idx]]
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.cfg_dropout
        ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
        t = torch.randint(scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        hidden = text_encoder(ids)[0]
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=hidden).sample, noise)
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * _lr_factor(step, cfg.unet_steps, min(200, cfg.unet_steps // 10 + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA with a short warm-up so tiny runs still move the saved weights
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    log["unet"] = {"steps": cfg.unet_steps, "seconds": round(time.time() - t0, 1), "final_loss": loss.item(),
                   "params_unet": _count(unet), "params_text_encoder": _count(text_encoder)}
    return ema_unet, ema_text, scheduler


def train_sd(out_dir: str, cfg: PretrainConfig, reuse_vae: bool = False) -> Dict:
    """Render, train VAE, encode, train UNet + text encoder; save a diffusers pipeline at ``out_dir/sd``.

    ``reuse_vae``: keep the VAE already saved in ``out_dir/sd/vae`` and (re)train only the UNet and text
    encoder on its latents. Because the trained VAE goes through its float16 storage before encoding,
    this gives the same UNet as a whole run with the same settings.
    """
    from diffusers import StableDiffusionPipeline

    from ..backends.base import load_vae

    log: Dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    t0 = time.time()
    images, captions = shapes.make_dataset(cfg.n_images, cfg.seed, "train")
    log["render_seconds"] = round(time.time() - t0, 1)
    tokenizer = _tokenizer()
    if reuse_vae:
        vae_dir = os.path.join(out_dir, "sd", "vae")
        if not os.path.isfile(os.path.join(vae_dir, "config.json")):
            raise FileNotFoundError(f"{vae_dir}: no VAE to reuse (train it with the 'sd' part first)")
        vae = load_vae(vae_dir, subfolder=None, torch_dtype=torch.float32).eval()
        log["vae"] = {"reused": vae_dir, "class": type(vae).__name__}
    else:
        vae = train_vae(images, cfg, log)
        if cfg.fp16_storage:
            vae = vae.half().float()  # the UNet learns the latents of the VAE that is shipped
    log["vae"]["heldout_reconstruction_accuracy"] = reconstruction_accuracy(vae, cfg.seed + 200)
    print(f"VAE reconstructions of held-out renders, checker accuracy: {log['vae']['heldout_reconstruction_accuracy']}",
          flush=True)
    t1 = time.time()
    latents = encode_latents(vae, images)
    scale = float(1.0 / latents.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scale)
    log["latent_scaling_factor"] = scale
    log["encode_seconds"] = round(time.time() - t1, 1)
    unet, text_encoder, scheduler = train_unet(latents * scale, captions, tokenizer, cfg, log)
    if cfg.fp16_storage:
        # float16 on disk only: diffusers loads UNet/VAE as float32, the backend casts the text encoder
        vae, text_encoder, unet = vae.half(), text_encoder.half(), unet.half()
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = os.path.join(out_dir, "sd")
    pipe.save_pretrained(path, safe_serialization=True)
    if cfg.fp16_storage:
        _load_as_float32(os.path.join(path, "text_encoder"))
    _compact_tokenizer(os.path.join(path, "tokenizer"))
    log["total_seconds"] = round(time.time() - t0, 1)
    log["process_cpu_seconds"] = round(time.process_time(), 1)
    with open(os.path.join(out_dir, "pretrain_sd.json"), "w") as f:
        json.dump(log, f, indent=2)
    return log


# -------------------------------------------------------------------------------- decoder fine-tune
def finetune_decoder(out_dir: str, cfg: PretrainConfig) -> Dict:
    """Fine-tune the VAE decoder of ``out_dir/sd`` with the encoder frozen (SD's ft-MSE recipe).

    The latents the UNet was trained on do not change, so the pipeline stays consistent. Pixels that
    differ from the corner (background) colour get weight ``1 + decoder_shape_weight``: shapes are a
    small fraction of the image and their colour is what the first VAE phase reproduced worst.
    """
    from ..backends.base import load_vae

    log: Dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    t0 = time.time()
    path = os.path.join(out_dir, "sd", "vae")
    vae = load_vae(path, subfolder=None, torch_dtype=torch.float32)
    images, _ = shapes.make_dataset(cfg.n_images, cfg.seed, "train")
    vae.requires_grad_(False)
    decoder = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    params = [p for m in decoder for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 14)
    bar = _progress(cfg.decoder_steps, "VAE decoder")
    for step in range(cfg.decoder_steps):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = _images_to_model_range(images[idx.numpy()])
        with torch.no_grad():
            z = vae_latents(vae, x)
        recon = vae.decode(z).sample
        loss = _weighted_rec_loss(recon, x, cfg.decoder_shape_weight)
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * _lr_factor(step, cfg.decoder_steps, min(50, cfg.decoder_steps // 10 + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    if cfg.fp16_storage:
        vae = vae.half()
    vae.save_pretrained(path, safe_serialization=True)
    log["decoder"] = {"steps": cfg.decoder_steps, "final_loss": loss.item()}
    log["total_seconds"] = round(time.time() - t0, 1)
    log["process_cpu_seconds"] = round(time.process_time(), 1)
    with open(os.path.join(out_dir, "pretrain_decoder.json"), "w") as f:
        json.dump(log, f, indent=2)
    return log


# ---------------------------------------------------------------------------------------- TinyCLIP
def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     same_caption: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) with several positives: pairs with identical captions are all targets.

    img, txt: ``[B, P]`` unnormalised; same_caption: bool ``[B, B]`` (diagonal true).
    """
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()
    target = same_caption.float() / same_caption.float().sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def train_tinyclip(out_dir: str, cfg: PretrainConfig) -> Dict:
    from transformers import CLIPImageProcessor, CLIPProcessor

    log: Dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    t0 = time.time()
    images, captions = shapes.make_dataset(cfg.n_images, cfg.seed + 100, "train")
    tokenizer = _tokenizer()
    unique = sorted(set(captions))
    caption_index = _index_of(captions, unique)
    ids_unique, mask_unique = _token_ids(tokenizer, unique)
    torch.manual_seed(cfg.seed + 3)
    model = models.build_tinyclip()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 13)
    bar = _progress(cfg.clip_steps, "TinyCLIP")
    for step in range(cfg.clip_steps):
        idx = torch.randint(len(images), (cfg.clip_batch,), generator=gen)
        cap = caption_index[idx]
        x = shapes.to_tensor(images[idx.numpy()])
        img = models.tinyclip_image_features(model, x)
        txt = models.tinyclip_text_features(model, ids_unique[cap], mask_unique[cap])
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        loss = contrastive_loss(img, txt, model.logit_scale, cap[:, None] == cap[None, :])
        for g in opt.param_groups:
            g["lr"] = cfg.clip_lr * _lr_factor(step, cfg.clip_steps, min(100, cfg.clip_steps // 10 + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    log["tinyclip"] = {"steps": cfg.clip_steps, "final_loss": loss.item(), "params": _count(model),
                       "logit_scale": float(model.logit_scale.exp())}
    path = os.path.join(out_dir, "tinyclip")
    if cfg.fp16_storage:
        model = model.half()
    model.save_pretrained(path, safe_serialization=True)
    if cfg.fp16_storage:
        _load_as_float32(path)
    size = models.TINYCLIP_VISION["image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                           image_mean=list(models.CLIP_MEAN), image_std=list(models.CLIP_STD)),
        tokenizer=tokenizer)
    processor.save_pretrained(path)
    _compact_tokenizer(path)
    log["total_seconds"] = round(time.time() - t0, 1)
    log["process_cpu_seconds"] = round(time.process_time(), 1)
    with open(os.path.join(out_dir, "pretrain_tinyclip.json"), "w") as f:
        json.dump(log, f, indent=2)
    return log


def pretrain(out_dir: str, cfg: PretrainConfig, parts=("sd", "decoder", "clip")) -> Dict:
    """Train the requested parts into ``out_dir`` and write the prompt lists; returns the logs."""
    os.makedirs(out_dir, exist_ok=True)
    shapes.write_prompt_files(out_dir)
    logs = {}
    if "sd" in parts or "unet" in parts:
        logs["sd"] = train_sd(out_dir, cfg, reuse_vae="sd" not in parts)
    if "decoder" in parts:
        logs["decoder"] = finetune_decoder(out_dir, cfg)
    if "clip" in parts:
        logs["clip"] = train_tinyclip(out_dir, cfg)
    return logs

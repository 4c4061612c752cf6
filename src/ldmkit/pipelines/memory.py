"""How many images to generate at once: an estimate of the memory one image needs against the
memory free on the device.

The estimates are deliberately rough upper bounds (attention scores counted as if materialised,
as PyTorch's math SDPA does on the CPU); they only have to keep a batch from running out of
memory, and a batch of one is always allowed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .stable_diffusion import StableDiffusion

FALLBACK_FREE_BYTES = 2 * 2**30  # assumed free memory when it cannot be measured
USABLE_FRACTION = 0.5  # share of the free memory a batch may take (fragmentation, other programs)
MAX_AUTO_BATCH = 16  # larger batches gain little speed and delay the first written image
UNET_LIVE_MAPS = 12  # feature maps of a level alive at once (skips, ResNet and transformer temps)
VAE_LIVE_MAPS = 6  # the same for the VAE decoder


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory plus what PyTorch has cached;
    on the CPU, Linux's MemAvailable; FALLBACK_FREE_BYTES when neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return meminfo_available() or FALLBACK_FREE_BYTES


def meminfo_available(path: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None when there is no such line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts kB
    return None


def unet_bytes_per_image(pipe: StableDiffusion, height: int, width: int) -> int:
    """Activation memory of one image's U-Net call, both CFG halves: per level, the live feature
    maps plus the attention scores (heads x tokens x (tokens + context tokens))."""
    cfg = pipe.unet.config
    tokens = (height // pipe.downscale) * (width // pipe.downscale)  # latent pixels at level 0
    context = pipe.text_encoder.config.max_position_embeddings
    elements = 0
    for level, (channels, attention, heads) in enumerate(zip(cfg.block_channels, cfg.attention_levels, cfg.num_heads)):
        t = tokens // 4**level  # each level halves height and width
        elements += UNET_LIVE_MAPS * channels * t
        if attention:
            elements += heads * t * (t + context)  # self- and cross-attention scores
    itemsize = next(pipe.unet.parameters()).element_size()
    return 2 * elements * itemsize  # x2: the unconditional and conditional halves of CFG


def decode_bytes(pipe: StableDiffusion, height: int, width: int) -> int:
    """Activation memory of decoding one image (or one tile when larger than vae_tile_size)."""
    cfg = pipe.vae.config
    tile = pipe.vae_tile_size
    h, w = (min(height, tile), min(width, tile)) if tile else (height, width)
    elements = sum(VAE_LIVE_MAPS * ch * (h >> level) * (w >> level) for level, ch in enumerate(cfg.block_channels))
    mid_tokens = (h // pipe.downscale) * (w // pipe.downscale)
    elements += mid_tokens * mid_tokens if cfg.mid_attention else 0  # one-head attention scores
    return elements * pipe.vae_dtype.itemsize


def auto_batch_size(pipe: StableDiffusion, height: int, width: int, num_images: int,
                    free_bytes: int | None = None) -> int:
    """The most images (1..min(num_images, MAX_AUTO_BATCH)) whose U-Net activations fit in
    USABLE_FRACTION of the free memory after one decode's worth is set aside."""
    free = free_memory(pipe.device) if free_bytes is None else free_bytes
    budget = free * USABLE_FRACTION - decode_bytes(pipe, height, width)
    fits = int(budget // unet_bytes_per_image(pipe, height, width))
    return max(1, min(fits, num_images, MAX_AUTO_BATCH))

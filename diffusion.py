"""The generators' side of the pipeline, shared by 03 (sampling candidates), 04 (Diffusion-DPO) and 05
(before vs after): load any diffusers text-to-image or AnimateDiff folder, encode captions, predict
noise, and the sampling loop. Paper section III-D aligns SDXL-Turbo and T2V-Turbo this way; here the
shipped toy generators (toy/generator_image, toy/generator_video) take their place through the same calls.

Shapes: pictures are x (B, 3, H, W) and clips x (B, 3, F, H, W) in [-1, 1] (the layouts
UNet2DConditionModel and UNetMotionModel take); with a VAE the same holds for its latents.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch


class NotAGenerator(ValueError):
    """The folder or hub id is not a diffusers text-to-image / text-to-video model."""


@dataclass
class Generator:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    vae: torch.nn.Module | None = None            # latent models (SD1.5, SDXL); None for pixel-space UNets
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (gives the pooled embedding)
    tokenizer_2: object = None
    medium: str = "image"                          # "video" for a UNetMotionModel

    @property
    def device(self):
        return next(self.unet.parameters()).device


def _model_index(path: str) -> dict:
    if Path(path).is_dir():
        index = Path(path) / "model_index.json"
        if not index.exists():
            raise NotAGenerator(f"{path} is not a diffusers model: it has no model_index.json")
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download   # a hub id: the same file, downloaded
    try:
        return json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())
    except Exception as e:
        raise NotAGenerator(f"{path}: no diffusers model_index.json found ({e})") from e


def load_generator(path: str, device: str = "cpu") -> Generator:
    """Each component named in model_index.json, loaded by the class it names (so an SD1.5, SDXL or
    AnimateDiff folder loads as the toy's does). A folder whose UNet is not a text-conditioned
    UNet2DConditionModel / UNetMotionModel raises NotAGenerator."""
    import diffusers
    import transformers
    index = _model_index(path)
    unet_cls = (index.get("unet") or [None, None])[1]
    if unet_cls not in ("UNet2DConditionModel", "UNetMotionModel") or "text_encoder" not in index:
        raise NotAGenerator(f"{path}: needs a text encoder and a UNet2DConditionModel or UNetMotionModel "
                            f"(model_index.json names unet={unet_cls})")
    parts = {}
    for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae", "text_encoder_2", "tokenizer_2"):
        if index.get(name) and index[name][1]:
            lib = diffusers if index[name][0] == "diffusers" else transformers
            parts[name] = getattr(lib, index[name][1]).from_pretrained(path, subfolder=name)
    gen = Generator(**parts, medium="video" if unet_cls == "UNetMotionModel" else "image")
    for m in (gen.unet, gen.text_encoder, gen.vae, gen.text_encoder_2):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return gen


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L) ids padded to the encoder's fixed length. A caption longer than that, or with a word the
    vocabulary lacks (the unknown token), raises ValueError naming it: callers skip and count it."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=False, return_tensors="pt").input_ids
    if ids.shape[1] > tokenizer.model_max_length:
        raise ValueError(f"caption longer than the text encoder's {tokenizer.model_max_length} tokens")
    for c in captions:   # a byte-level BPE (CLIP's own) never needs the unknown token; a toy vocabulary may
        if tokenizer.unk_token is not None and tokenizer.unk_token in tokenizer.tokenize(c):
            raise ValueError(f"the tokenizer cannot encode {c!r}")
    return ids


def check_caption(gen: Generator, caption: str) -> str | None:
    """Why `caption` cannot condition `gen`, or None."""
    try:
        tokenize(gen.tokenizer, [caption])
    except ValueError as e:
        return str(e)
    return None


def encode_captions(gen: Generator, captions: list[str]) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning: hidden (B, L, D) for cross-attention, plus SDXL's added conditions.

    SDXL concatenates the penultimate hidden states of its two encoders (D = 768 + 1280) and adds the
    second encoder's pooled embedding and the 'time ids' (original size, crop, target size) to the
    timestep embedding; SD1.5-style models and the toy use the last hidden state of one encoder."""
    dev = gen.device
    ids = tokenize(gen.tokenizer, captions).to(dev)
    if gen.text_encoder_2 is None:
        return gen.text_encoder(ids).last_hidden_state, None
    ids2 = tokenize(gen.tokenizer_2, captions).to(dev)
    h1 = gen.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = gen.text_encoder_2(ids2, output_hidden_states=True)
    size = gen.unet.config.sample_size * (2 ** (len(gen.vae.config.block_out_channels) - 1))
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=h1.dtype, device=dev).repeat(len(captions), 1)
    return torch.cat([h1, out2.hidden_states[-2]], -1), {"text_embeds": out2.text_embeds, "time_ids": time_ids}


def model_output(gen: Generator, unet, x_t, t, hidden, added=None) -> torch.Tensor:
    """The UNet's prediction at (x_t, t, caption), (B, ...) like x_t: the noise or the velocity, as
    target() says. `unet` is gen.unet or a trained copy of it. A motion UNet folds frames into the
    batch inside, so each frame gets its caption's states."""
    if gen.medium == "video":
        hidden = hidden.repeat_interleave(x_t.shape[2], dim=0)
    t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
    return unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def add_noise(gen: Generator, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with
    a_t the cumulative product of (1 - beta) at integer timestep t (B,), the schedule every Stable Diffusion
    scheduler carries. Written out rather than scheduler.add_noise, which some samplers (Euler) tie to
    their inference timesteps."""
    a = gen.scheduler.alphas_cumprod.to(x0.device)[t.to(x0.device)].float().view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def target(gen: Generator, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output at x_t = add_noise(x0, eps, t), by the scheduler's
    prediction_type: the noise eps (Ho et al. 2020; SD1.5, SDXL, the toy generators), the velocity
    v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022; SD2) or x0 itself. Each error is the error
    in x0 times a weight, SNR(t) for eps and SNR(t) + 1 for v, so training and Diffusion-DPO must
    compare the prediction with the target the checkpoint was made for. (B, ...) like x0."""
    kind = gen.scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    a = gen.scheduler.alphas_cumprod.to(x0.device)[t.to(x0.device)].float().view(-1, *[1] * (x0.ndim - 1))
    if kind == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if kind == "sample":
        return x0
    raise NotAGenerator(f"unknown prediction_type {kind!r} in the scheduler's config")


def to_model_space(gen: Generator, pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (B, H, W, 3) or (B, F, H, W, 3) -> x0 in the UNet's space: [-1, 1] at its resolution,
    or VAE latents times the VAE's scaling factor."""
    x = torch.tensor(np.asarray(pixels), dtype=torch.float32, device=gen.device) / 127.5 - 1
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)   # channels first
    if gen.vae is None:
        size = gen.unet.config.sample_size
        if x.ndim == 4 and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        elif x.ndim == 5 and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], size, size), mode="area")
        return x
    return gen.vae.encode(x.to(gen.vae.dtype)).latent_dist.sample() * gen.vae.config.scaling_factor


def to_pixels(gen: Generator, x: torch.Tensor, px: int | None = None) -> np.ndarray:
    """The inverse of to_model_space: (B, 3, [F,] H, W) -> uint8 (B, [F,] px, px, 3)."""
    if gen.vae is not None:
        x = gen.vae.decode(x / gen.vae.config.scaling_factor).sample
    x = x.float().clamp(-1, 1)
    if px and x.shape[-1] != px:   # nearest: a 32 px sample shown at the judge's 64 px keeps its edges
        x = torch.nn.functional.interpolate(x, size=(px, px) if x.ndim == 4 else (x.shape[2], px, px), mode="nearest")
    x = x.permute(0, 2, 3, 1) if x.ndim == 4 else x.permute(0, 2, 3, 4, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def noise_shape(gen: Generator, n: int) -> tuple:
    c, s = gen.unet.config.in_channels, gen.unet.config.sample_size
    return (n, c, 8, s, s) if gen.medium == "video" else (n, c, s, s)


@torch.no_grad()
def sample(gen: Generator, captions: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.0,
           unet=None, px: int | None = None) -> np.ndarray:
    """One sample per (caption, seed): the reverse diffusion written out (DDPM/DDIM, Ho et al. 2020).

    x_T ~ N(0, I) from the seed alone, so a caption and seed give the same sample in any batch; then
    for each of `steps` timesteps the UNet predicts the noise (or velocity) with and without the caption,
    classifier-free guidance extrapolates out = out_empty + w (out_caption - out_empty) (Ho & Salimans
    2022), and scheduler.step moves x_t to x_{t-1}; a VAE decodes the final latents. Returns uint8 pixels (B, [F,] H, W, 3)."""
    unet = unet or gen.unet
    dev = gen.device
    x = torch.stack([torch.randn(noise_shape(gen, 1)[1:], generator=torch.Generator().manual_seed(s))
                     for s in seeds]).to(dev)
    hidden, added = encode_captions(gen, list(captions) + [""] * len(captions))   # captioned, then empty
    gen.scheduler.set_timesteps(steps)
    x = x * gen.scheduler.init_noise_sigma
    for t in gen.scheduler.timesteps:
        x_in = gen.scheduler.scale_model_input(torch.cat([x, x]), t)   # identity for DDIM; Euler (SDXL) rescales
        out_c, out_u = model_output(gen, unet, x_in, t.to(dev), hidden, added).chunk(2)
        out = out_u + guidance * (out_c - out_u)   # linear in the output, so the same for eps and v
        x = gen.scheduler.step(out, t, x).prev_sample
    return to_pixels(gen, x, px)


def save_generator(gen: Generator, out, extra: dict | None = None) -> None:
    """Write every component in DiffusionPipeline's layout (model_index.json naming each class, one
    subfolder each), atomically: into a temp folder renamed over the old one. `extra` goes to
    train_state.pt; files kept beside the components (log.jsonl) travel along."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    index = {"_class_name": "AnimateDiffPipeline" if gen.medium == "video" else "StableDiffusionPipeline"}
    for f in fields(gen):
        part = getattr(gen, f.name)
        if f.name == "medium" or part is None:
            continue
        part.save_pretrained(tmp / f.name)
        index[f.name] = ["transformers" if type(part).__module__.startswith("transformers") else "diffusers",
                         type(part).__name__]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    if extra is not None:
        torch.save(extra, tmp / "train_state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        for f in out.iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)

"""The tiny text-to-image and text-to-video generators that stand in for SDXL-Turbo and an AnimateDiff
model (paper section III-D): real diffusers classes in miniature, built here and pretrained by
toy/pretrain_generator.py into toy/generator_image/ and toy/generator_video/, folders in the layout
`DiffusionPipeline.save_pretrained` writes (model_index.json, unet/, text_encoder/, tokenizer/,
scheduler/), so diffusion.load_generator reads them with the calls a hub checkpoint takes.

* Pictures: a pixel-space `UNet2DConditionModel` (3 channels in and out, 16 x 16, no VAE: at this size
  a latent space would save nothing) cross-attending to a tiny `CLIPTextModel`.
* Clips: the pretrained picture generator turned into a `UNetMotionModel` with a `MotionAdapter`, the
  maintained AnimateDiff route: its spatial layers and text encoder, plus temporal attention over the 8
  frames after each spatial block; trained to predict v rather than the noise.
* The `CLIPTokenizer` is built offline: one token per caption word, as a BPE vocabulary whose merges
  spell each word out from its letters.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from toy import world

# The words of every generation caption ("a red square at the top", "a red square moving left").
CAPTION_WORDS = sorted({"a", "square", "at", "the", "on", "moving", *world.COLOURS, *world.POSITIONS,
                        *world.DIRECTIONS})
# 16 px: the toy's 64 px media at a quarter size (the squares 3-6 px), three levels (16, 8, 4 px) so the
# deepest features span the frame; 8 frames as the toy's clips.
GEN = dict(px=16, frames=8, channels=(16, 32, 32), layers_per_block=1, head_dim=8, norm_groups=8,
           text_hidden=64, text_layers=2, text_heads=2, text_ffn=128, max_tokens=12, train_timesteps=1000)


def build_clip_tokenizer(folder, words=CAPTION_WORDS):
    """A CLIPTokenizer (vocab.json + merges.txt in `folder`) that keeps each of `words` as one token.

    CLIP's BPE marks a word's last symbol with '</w>'. Every letter and every letter + '</w>' is in the
    vocabulary, so any lower-case word still encodes (as letters); the merges join each caption word
    left to right, so those become single tokens."""
    from transformers import CLIPTokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = []
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            if left not in vocab:
                vocab.append(left)
        if len(symbols) == 1 and symbols[0] not in vocab:
            vocab.append(symbols[0])
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=GEN["max_tokens"])
    tok.save_pretrained(folder)
    return tok


def build_generator(medium: str, folder, seed: int = 0, sizes: dict = GEN, picture=None) -> dict:
    """Components of the tiny generator for `medium` ("image" or "video"), with the tokenizer written to
    folder/tokenizer. Randomly initialised, except that a clip generator built on `picture` (a loaded
    diffusion.Generator) takes its text encoder and spatial UNet layers, as AnimateDiff inflates a
    trained text-to-image model; its motion modules start random. Returns {unet, text_encoder,
    tokenizer, scheduler}."""
    from diffusers import DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    s = sizes
    tokenizer = build_clip_tokenizer(Path(folder) / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=s["text_hidden"], intermediate_size=s["text_ffn"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        max_position_embeddings=s["max_tokens"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    heads = tuple(c // s["head_dim"] for c in s["channels"])
    unet = UNet2DConditionModel(
        sample_size=s["px"], in_channels=3, out_channels=3, block_out_channels=s["channels"],
        layers_per_block=s["layers_per_block"], norm_num_groups=s["norm_groups"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=s["text_hidden"], attention_head_dim=heads)
    if picture is not None:   # the random ones are drawn all the same, so the motion modules start from
        text_encoder, unet = picture.text_encoder, picture.unet   # one random stream with or without it
    if medium == "video":
        adapter = MotionAdapter(block_out_channels=s["channels"], motion_layers_per_block=s["layers_per_block"],
                                motion_num_attention_heads=2, motion_norm_num_groups=s["norm_groups"],
                                motion_max_seq_length=s["frames"], use_motion_mid_block=False)
        unet = UNetMotionModel.from_unet2d(unet, adapter)
    # DDIM: deterministic given the starting noise, and good in 20-50 steps. The betas are the cosine
    # schedule made for small pixel-space images (Nichol & Dhariwal 2021), whose last timestep leaves no
    # signal, so sampling from pure noise starts where training ended (with Stable Diffusion's
    # scaled-linear betas 7% of the picture survives at t = 999; Lin et al. 2024).
    # Clips predict the velocity v instead of the noise (diffusion.target). A clip's eight frames pool
    # their evidence, so its track shows through the noise up to t ~ 900, and the caption's direction
    # only decides the layout above that, where epsilon-prediction weighs errors by SNR(t) ~ 0; v weighs
    # them by SNR(t) + 1 (Salimans & Ho 2022; Lin et al. 2024 ask for v with a zero-SNR last step).
    scheduler = DDIMScheduler(num_train_timesteps=s["train_timesteps"], beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, set_alpha_to_one=False,
                              prediction_type="v_prediction" if medium == "video" else "epsilon")
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

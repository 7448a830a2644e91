"""How toy/generator_image/ and toy/generator_video/ were made: the tiny diffusers generators
(toy/tiny_generator.py) pretrained from random weights by denoising toy-world media (Ho et al. 2020:
predict the noise added at a random timestep, mean squared error).

They play SDXL-Turbo and an AnimateDiff model: generators that follow their prompts imperfectly, so that
the judge's pairs have something to fix (paper section III-D). The imperfection is built in, as web
captions build it into real generators: a share of the training captions name a position (pictures) or
a direction (clips) other than the one shown, and a few another colour. Some media carry the world's
noise or blur defects, so quality differs between samples too. Captions are dropped 10% of the time,
which classifier-free guidance needs (Ho & Salimans 2022).

The clip generator starts from the picture generator (AnimateDiff's recipe: a trained text-to-image
model plus motion modules). All of its UNet is trained, not only the motion modules as AnimateDiff
does: the toy's frames carry a motion trail that no picture shows.

Only the UNet is trained. The text encoder stays as initialised, as Stable Diffusion keeps its CLIP
encoder frozen; random weights already give every caption word distinct states. Trained jointly from
random weights, the encoder gave the four position words nearly one state (the colour words stayed far
apart), and the UNet then had nothing to place the square by.

Run once per release; it ends by reading samples of every caption back with toy/reader.py and writes
MANIFEST.json (sha256 of each file, the command, that table):

    python -m toy.pretrain_generator --medium image --out toy/generator_image
    python -m toy.pretrain_generator --medium video --out toy/generator_video --steps 6000 --batch 8

(`--init FOLDER` continues an earlier run, for runs longer than one sitting.) The clip generator predicts
v rather than the noise (toy/tiny_generator.py says why); it draws the captioned colour in 98% of its
probe's samples and the direction in 36% (chance: 25%).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
import diffusion
from toy import reader, world
from toy.tiny_generator import GEN, build_generator


@dataclasses.dataclass
class Config:
    medium: str = "image"            # image or video
    out: str = "toy/generator_image"
    seed: int = 0
    steps: int = 6000                # optimizer steps (0.26 s each on 2 cores)
    batch: int = 32
    lr: float = 1e-3                 # peak AdamW learning rate (100 warmup steps, cosine to 10%)
    wrong_place: float = 0.3         # share of captions naming another position / direction than shown
    wrong_colour: float = 0.1        # share naming another colour
    defects: float = 0.2             # share of noisy or blurry media
    drop_caption: float = 0.1        # share trained with the empty caption (classifier-free guidance)
    probe_per_caption: int = 8       # samples of each of the 16 captions read back at the end
    picture: str = "toy/generator_image"  # the picture generator a clip generator starts from
    init: str = ""                   # continue from this generator folder instead (a longer run in parts; its
                                     # manifest's command and seconds are carried over)


def training_example(medium: str, rng, cfg: Config) -> tuple[str, np.ndarray]:
    """(caption, pixels at the generator's size): the caption of a scene, the media of a noisier one."""
    scene = world.sample_scene(medium, rng)
    place = world.CAPTION_ATTRS[medium][1]
    miss = [bool(rng.random() < cfg.wrong_colour), bool(rng.random() < cfg.wrong_place)]
    shown = world.perturb(scene, ("colour", place), miss, medium, rng)
    defect = str(rng.choice(world.DEFECTS)) if rng.random() < cfg.defects else None
    pixels = world.render(medium, shown, defect, rng)
    frames = pixels[None] if medium == "image" else pixels
    small = np.stack([np.asarray(Image.fromarray(f).resize((GEN["px"],) * 2, Image.BOX)) for f in frames])
    caption = "" if rng.random() < cfg.drop_caption else world.caption(medium, scene)
    return caption, small[0] if medium == "image" else small


def probe(gen: diffusion.Generator, medium: str, per_caption: int, seed: int = 10_000) -> dict:
    """Share of samples showing each caption attribute, and all of them, over every caption."""
    scenes = [dict(s, size="small") for s in all_scenes(medium)]
    rows = {a: [] for a in world.CAPTION_ATTRS[medium]}
    for i, scene in enumerate(scenes):
        seeds = [seed + i * per_caption + k for k in range(per_caption)]
        for px in diffusion.sample(gen, [world.caption(medium, scene)] * per_caption, seeds):
            for a, ok in reader.caption_right(medium, scene, px).items():
                rows[a].append(ok)
    table = {a: round(float(np.mean(v)), 4) for a, v in rows.items()}
    table["all"] = round(float(np.mean(np.all([rows[a] for a in rows], 0))), 4)
    return table


def all_scenes(medium: str) -> list[dict]:
    a, b = world.CAPTION_ATTRS[medium]
    vals = world.attrs_of(medium)
    return [{a: x, b: y} for x in vals[a] for y in vals[b]]


def main(cfg: Config) -> None:
    common.set_seed(cfg.seed)
    out = Path(cfg.out)
    if cfg.init:
        gen = diffusion.load_generator(cfg.init)
        before = json.loads((Path(cfg.init) / "MANIFEST.json").read_text())
    else:
        picture = diffusion.load_generator(cfg.picture) if cfg.medium == "video" else None
        gen = diffusion.Generator(**build_generator(cfg.medium, out, cfg.seed, picture=picture), medium=cfg.medium)
        before = {"command": "", "pretrain_seconds": 0}
    unet = gen.unet.train().requires_grad_(True)
    gen.text_encoder.eval().requires_grad_(False)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    n_timesteps = gen.scheduler.config.num_train_timesteps
    t0, losses = time.time(), []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, cfg.steps, cfg.lr, 100)
        captions, pixels = zip(*(training_example(cfg.medium, rng, cfg) for _ in range(cfg.batch)))
        x0 = diffusion.to_model_space(gen, np.stack(pixels))
        noise = torch.randn_like(x0)
        t = torch.randint(0, n_timesteps, (cfg.batch,))
        hidden, _ = diffusion.encode_captions(gen, list(captions))
        pred = diffusion.model_output(gen, unet, diffusion.add_noise(gen, x0, noise, t), t, hidden)
        loss = torch.nn.functional.mse_loss(pred, diffusion.target(gen, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == cfg.steps - 1:
            print(f"step {step}: loss {np.mean(losses[-200:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
    unet.eval()
    seconds = round(time.time() - t0) + before["pretrain_seconds"]
    table = probe(gen, cfg.medium, cfg.probe_per_caption)
    print("probe:", table)
    diffusion.save_generator(gen, out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest = {"files": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
                "command": (before["command"] + " && " if before["command"] else "")
                           + "python -m toy.pretrain_generator " + " ".join(sys.argv[1:]),
                "probe": table, "pretrain_seconds": seconds, "config": dataclasses.asdict(cfg),
                "made_with": {"python": platform.python_version(), "torch": torch.__version__,
                              "diffusers": __import__("diffusers").__version__, "threads": torch.get_num_threads()}}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out} ({seconds}s of training)")


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))

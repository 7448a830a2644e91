"""How toy/base/ was made: the tiny Qwen2.5-VL pretrained from random weights on the toy world.

A real run of UnifiedReward starts from a checkpoint that already sees (Qwen2.5-VL-3B-Instruct). The toy
world's stand-in is built here, once per release, and shipped in toy/base/ like a downloaded checkpoint,
so that every machine starts from the same bytes: pretraining from random weights is not part of the
method, and whether a tiny model learns to *check* a caption against pixels within a few thousand steps
depends on the seed, the CPU and the thread count (each changes the order in which kernels add numbers).

The recipe teaches the model to describe pictures and clips, to check words against them, and to answer
the policy's questions, briefly: it perceives the toy world but stays an imperfect answerer of the
questions, so DPO has something to improve. It ends by probing the result (toy/probe.py) and writing
MANIFEST.json: the sha256 of every file, the command, and the probe table.

    python -m toy.pretrain_base --out toy/base              # about 10 minutes on 2 CPU cores
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

import common
import judging
import vlm
from toy import probe, world
from toy.tiny_vlm import TINY, build_tiny_vlm


@dataclasses.dataclass
class Config:
    out: str = "toy/base"            # the checkpoint folder written (save_pretrained layout + MANIFEST.json)
    seed: int = 0                    # initialisation, the examples and the tokenizer's corpus
    text_layers: int = 4             # language-model layers (4 checked colour reliably, 2 not; 6 checked direction
                                     # at 85% with these steps, at one seed its judge's generation pairs: 78%)
    batch: int = 16                  # examples per step
    base_steps: int = 2000           # first phase: the general mix
    base_lr: float = 1e-3            # its peak learning rate
    qa_share: float = 0.03           # its share of the policy's two-attribute questions: kept small, so the base
                                     # answers them imperfectly and DPO has work to do
    verify_share: float = 0.6        # share of yes/no checks (the rest is description): checking a word against
                                     # the pixels is what a judge needs, and what plateaus longest
    multi_share: float = 0.15        # share of two-picture / two-clip examples asking about one of them
    ground: float = 1.0              # weight of the grounding loss on visual tokens (see pretrain)
    quality_steps: int = 800         # second phase: defects in half the media (0 = none). 2,400 (QA share 0.0033, as
                                     # many questions) sharpened the judge (clip scores 96-99% exact, clip pairs
                                     # 89-93%) but the base then answered 91.5% of picture questions: no room for DPO
    quality_lr: float = 5e-4         # its peak learning rate
    quality_defects: float = 0.5     # its share of noisy or blurry media (the first phase: 0.3)
    quality_qa_share: float = 0.01   # its share of the policy's questions (0.03 left nothing for DPO, 0 forgot them)
    probe_n: int = 240               # scenes the finished base is probed on (toy/probe.py)


# The first phase shows milder defects than the world's (noise sd 45 instead of 60, blur radius 2.5
# instead of 3.5), a curriculum: with the world's own defects in the first phase, 1,200 to 2,000 steps
# left the position or direction checks near chance. The second phase shows the world's.
FIRST_PHASE_DEFECTS = (45, 2.5)
# The tokenizer is trained on the texts of the default toy world (01_prepare_data.py's sizes).
CORPUS_WORLD = dict(train_per_group=1000, test_per_group=150, policy_train=200, policy_test=200,
                    gen_prompts=60, gen_candidates=10)


# ---------------------------------------------------------------------------------------------
# the pretraining mix

def base_example(rng, qa_share: float, verify_share: float, multi_share: float, defect_share: float,
                 strength=world.DEFECT_STRENGTH):
    """One pretraining example: (medium kind, [pixels per medium], question, answer, [words each shows]).
    Three kinds, as a generic VLM is trained on: descriptions (naming quality defects too, "..., noisy"),
    the two-attribute questions the policy will face, and yes/no checks, half of one attribute ("Is the
    square red?"), half of a whole caption ("Is it a red square at the top?": yes only when both named
    attributes are right). With caption checks the base checks two attributes at once and a judge learns
    two-attribute scores from it; with one-attribute checks only, judges learnt one of the two and
    stalled. A `multi_share` of the examples shows two pictures or two clips (multi_example)."""
    medium = "image" if rng.random() < 0.5 else "video"
    if rng.random() < multi_share:
        return multi_example(medium, rng, defect_share, strength)
    scene = world.sample_scene(medium, rng)
    defect = str(rng.choice(world.DEFECTS)) if rng.random() < defect_share else None
    pixels = world.render(medium, scene, defect, rng, strength)
    shown = " ".join(scene.values()) + (f" {world.DEFECT_WORDS[defect]}" if defect else "")
    u = rng.random()
    if u < qa_share:
        question, asked = world.question_for(medium, rng)
        return medium, [pixels], question, world.answer_text(scene, asked), [shown]
    if u < qa_share + verify_share:
        if rng.random() < 0.5:
            return medium, [pixels], *caption_check(medium, scene, rng), [shown]
        attrs = world.attrs_of(medium)
        attr = str(rng.choice(list(attrs)))
        yes = bool(rng.random() < 0.5)
        value = scene[attr] if yes else str(rng.choice([v for v in attrs[attr] if v != scene[attr]]))
        return medium, [pixels], world.check_question(attr, value), "yes" if yes else "no", [shown]
    return medium, [pixels], world.DESCRIBE[medium], world.described(medium, scene, defect), [shown]


def multi_example(medium: str, rng, defect_share: float, strength=world.DEFECT_STRENGTH):
    """Two pictures (or clips) of similar scenes, one of them addressed by its label: "Describe Picture 2."
    or "Is Video 1 a red square moving left?". Real VLMs are pretrained on multi-image data; a pairwise
    judge needs exactly this, to check each of two candidates against one caption. The second scene
    differs from the first in each captioned attribute with probability 1/2, so the answer depends on
    which medium is addressed."""
    attrs = world.CAPTION_ATTRS[medium]
    first = world.sample_scene(medium, rng)
    scenes = [first, world.perturb(first, attrs, [bool(rng.random() < 0.5) for _ in attrs], medium, rng)]
    scenes[1]["size"] = str(rng.choice(list(world.attrs_of(medium)["size"])))
    if rng.random() < 0.5:
        scenes.reverse()
    defects = [str(rng.choice(world.DEFECTS)) if rng.random() < defect_share else None for _ in scenes]
    pixels = [world.render(medium, sc, d, rng, strength) for sc, d in zip(scenes, defects)]
    shown = [" ".join(sc.values()) + (f" {world.DEFECT_WORDS[d]}" if d else "") for sc, d in zip(scenes, defects)]
    k = int(rng.integers(2))
    label = f"{'Picture' if medium == 'image' else 'Video'} {k + 1}"
    if rng.random() < 0.5:
        return medium, pixels, f"Describe {label}.", world.described(medium, scenes[k], defects[k]), shown
    return medium, pixels, *caption_check(medium, scenes[k], rng, label), shown


def caption_check(medium: str, scene: dict, rng, subject: str = "it") -> tuple[str, str]:
    """(question, yes/no) checking a caption against `scene`; each captioned attribute is named wrong
    with probability 0.3, so about half the answers are "yes"."""
    attrs = world.CAPTION_ATTRS[medium]
    miss = [bool(rng.random() < 0.3) for _ in attrs]
    named = world.perturb(scene, attrs, miss, medium, rng)
    return world.caption_question(medium, named, subject), "no" if any(miss) else "yes"


def toy_corpus(records, prompts, gen_rows) -> list[str]:
    """Every text the toy world produces, for training the tiny tokenizer."""
    texts = [r["question"] for r in records] + [r["answer"] for r in records]
    texts += [p["question"] for p in prompts] + [p["answer"] for p in prompts] + [g["prompt"] for g in gen_rows]
    texts += list(world.DESCRIBE.values()) + [f", {w}" for w in world.DEFECT_WORDS.values()] + ["yes", "no"]
    texts += [world.caption_question("image", {"colour": c, "position": p})
              for c in world.COLOURS for p in world.POSITIONS]
    texts += [f"Describe {label} {k}." for label in ("Picture", "Video") for k in (1, 2)]
    texts += [world.caption_question(medium, {"colour": c, "position": "top", "direction": "up"}, f"{label} {k}")
              for medium, label in (("image", "Picture"), ("video", "Video")) for c in world.COLOURS for k in (1, 2)]
    texts += [world.check_question(a, v) for medium in ("image", "video")
              for a, vals in world.attrs_of(medium).items() for v in vals]
    for medium in ("image", "video"):
        for colour in world.COLOURS:
            scene = {**{a: v[0] for a, v in world.attrs_of(medium).items()}, "colour": colour}
            texts.append(world.description(medium, scene))
    for task in common.TASKS:   # every verdict the judge can give, whatever the data happens to contain
        for kind in common.KINDS:
            texts += [a for _, a in judging.verdict_candidates(task, kind, (0, 9))]
    return texts


def world_corpus(seed: int) -> list[str]:
    """The tokenizer's corpus: the default toy world's texts, drawn without writing any media, before
    any training answer is rewritten in the wrong form (those are the same words in other orders)."""
    rows, _ = world.draw(seed, CORPUS_WORLD, world.DryWriter(), malformed=0.0)
    return toy_corpus(rows["reward_train"] + rows["reward_test"], rows["prompts_train"] + rows["prompts_test"],
                      rows["gen_candidates"])


# ---------------------------------------------------------------------------------------------
# the grounding loss

class VisualTokens:
    """Captures the merged visual tokens (the vision tower's output, in the language model's embedding
    space) during the ordinary forward pass, so the grounding loss costs no extra vision pass."""

    def __init__(self, model):
        self.outputs = []
        model.model.visual.register_forward_hook(lambda mod, args, out: self.outputs.append(out.pooler_output))

    def pooled(self, batch) -> torch.Tensor:
        """(n_media, H): the mean visual token of each medium, images first then videos, as the model
        consumes them (the hook saw the image call, then the video call)."""
        grids = [g for k in ("image_grid_thw", "video_grid_thw") if k in batch for g in batch[k]]
        tokens = torch.cat(self.outputs)
        self.outputs.clear()
        sizes = [int(g.prod()) // 4 for g in grids]   # 2x2 spatial merge
        return torch.stack([t.mean(0) for t in torch.split(tokens, sizes)])


def grounding_targets(processor, shown_in_order) -> tuple[list[int], torch.Tensor]:
    """Multi-hot targets over the attribute words for each medium: (attribute token ids, (n, K) 0/1).
    shown_in_order: per medium, the words it shows ("red top small noisy")."""
    ids = []
    for w in world.WORDS:
        tok = processor.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        assert len(tok) == 1, f"attribute word {w!r} is not one token"
        ids.append(tok[0])
    target = torch.tensor([[float(w in shown.split()) for w in world.WORDS] for shown in shown_in_order])
    return ids, target


# ---------------------------------------------------------------------------------------------
# pretraining

def pretrain(cfg: Config, corpus: list[str]):
    """Build the tiny VLM and pretrain it (a plain loop; 02_train_reward.py has the full-featured one).
    Deterministic on CPU for a given seed, machine and number of threads; bf16 kernels on CUDA are not.

    Besides the answer cross-entropy, a grounding loss asks the mean visual token of each medium to name
    the medium's attributes through the (tied) language-model head. Real VLMs come with visual tokens
    that already sit near the words for what they show (LLaVA trains its projector for exactly that);
    from random weights that alignment is what makes cross-modal comparison learnable: "Is the square
    red?" went from chance after 1,500 steps to 100% after 500 with it.

    Two phases, as VLM recipes end on a smaller, curated stage, each with its own optimizer, schedule and
    random stream: the general mix with milder defects in 30% of the media, then the same mix with the
    world's defects in half of them at a lower rate. The general phase alone never learnt to see defects;
    the second teaches them and sharpens the checks, and asks fewer of the policy's questions."""
    common.set_seed(cfg.seed)
    device = common.get_device()     # fp32 weights; on CUDA the forward runs under bf16 autocast
    model, processor = build_tiny_vlm(corpus, cfg.seed, dict(TINY, text_layers=cfg.text_layers))
    model.to(device)
    visual = VisualTokens(model)
    pad = processor.tokenizer.pad_token_id
    t0 = time.time()
    # (name, steps, peak lr, warmup, share of policy questions, share of defective media, defect strength, stream)
    phases = [("base", cfg.base_steps, cfg.base_lr, 100, cfg.qa_share, 0.3, FIRST_PHASE_DEFECTS, [cfg.seed, 7]),
              ("quality", cfg.quality_steps, cfg.quality_lr, 50, cfg.quality_qa_share, cfg.quality_defects,
               world.DEFECT_STRENGTH, [cfg.seed, 77])]
    for name, steps, peak, warmup, qa_share, defects, strength, stream in phases:
        optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0, foreach=True)
        rng = np.random.default_rng(stream)
        model.train()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(step, steps, peak, warmup)
            examples = [base_example(rng, qa_share, cfg.verify_share, cfg.multi_share, defects, strength)
                        for _ in range(cfg.batch)]
            encoded = vlm.encode_many(processor, [([world.as_media(m, px) for px in pixels], q, a)
                                                     for m, pixels, q, a, _ in examples])
            batch = vlm.to_device(vlm.collate(encoded, pad), device)
            shown = [w for kind in ("image", "video") for e in examples if e[0] == kind for w in e[4]]
            ids, target = grounding_targets(processor, shown)
            with common.autocast(device):
                ce = -vlm.answer_token_logps(model, batch)[0].mean()     # cross-entropy on the answer tokens
                logits = model.lm_head(visual.pooled(batch))[:, ids].float()  # (n_media, K)
            ground = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.to(device))
            loss = ce + cfg.ground * ground
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % 250 == 0 or step + 1 == steps:
                print(f"  {name} step {step + 1}/{steps}  answer loss {ce.item():.3f}  "
                      f"grounding {ground.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return model.cpu(), processor


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path, command: str, probe_rows: dict, seconds: float) -> dict:
    """MANIFEST.json beside the weights: what the checkpoint is, how it was made, what it can do."""
    manifest = {"files": {f.name: sha256(f) for f in sorted(out.iterdir()) if f.name != "MANIFEST.json"},
                "command": command, "probe": probe_rows, "pretrain_seconds": round(seconds),
                "made_with": {"python": platform.python_version(), "torch": torch.__version__,
                              "machine": platform.machine(), "threads": torch.get_num_threads()}}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(cfg: Config) -> None:
    t0 = time.time()
    corpus = world_corpus(cfg.seed)
    print(f"tokenizer corpus: {len(corpus)} texts of the default toy world ({time.time() - t0:.0f}s)")
    model, processor = pretrain(cfg, corpus)
    seconds = time.time() - t0
    out = Path(cfg.out)
    common.save_checkpoint(model, processor, out)
    rows = probe.run(out, cfg.probe_n, cfg.seed)
    print(probe.table(rows))
    write_manifest(out, "python -m toy.pretrain_base " + " ".join(sys.argv[1:]), rows, seconds)
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters, done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))

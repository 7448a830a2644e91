"""Stage 1: preference data for the four tasks, merged into one format (paper section III-A, Table II).

UnifiedReward trains one judge on pairwise and pointwise preference data for image generation, image
understanding, video generation and video understanding. This stage writes that data as one stream of
unified records (DESIGN.md section 4).

With no arguments it builds the embedded toy world: synthetic 64x64 pictures and 8-frame clips of a
coloured square whose ground truth is known, so every later stage can be checked against the truth.
It also builds the tiny base VLM that stands in for a downloaded checkpoint (`runs/toy/base/`).

    python 01_prepare_data.py                    # toy world -> runs/toy/data, runs/toy/base
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

import common

# ---------------------------------------------------------------------------------------------
# the toy world
#
# One square per picture or clip. Attributes were chosen for what a tiny vision tower perceives after
# minutes of CPU training: colour, where the square is (spatial), how big it is, and for clips which
# way it moves (temporal). Every judgment depends on the pixels: the text alone is uninformative
# because wrong attribute values are drawn uniformly, so right and wrong answers look alike. (Training
# records also hold answers of the wrong form, which the text alone gives away; held-out ones do not.)

COLOURS = {"red": (220, 50, 50), "green": (60, 190, 70), "blue": (60, 100, 235), "yellow": (230, 210, 50)}
POSITIONS = ("top", "bottom", "left", "right")   # which edge of the picture the square sits by
SIZES = {"small": 12, "large": 24}           # side of the square in pixels (clips: see VIDEO_SIZES)
VIDEO_SIZES = {"small": 10, "large": 18}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DEFECTS = ("noise", "blur")                  # quality defects of generated media
# (noise sd in pixel values, blur radius in px): the world's defects, and the milder ones of the base's
# first, general pretraining phase (kept as they were when that phase was tuned; see pretrain_base)
STRENGTH = {"world": (60, 3.5), "mild": (45, 2.5)}
PX, FRAMES, STEP = 64, 8, 5                  # frame size, frames per clip, motion in pixels per frame


def _backdrop() -> np.ndarray:
    """(64, 64, 3) uint8 dark backdrop lit unevenly: redder to the right, bluer to the bottom.
    Qwen2.5-VL's position encodings are relative (rotary), so a patch of plain background cannot tell
    where in the frame it is; a faint gradient gives every patch an absolute address, as the sky above
    and the ground below do in a photograph. Measured: captioning learned 'where' in 750 instead of
    1250 steps with it."""
    yy, xx = np.mgrid[0:PX, 0:PX] / (PX - 1)
    return np.stack([40 + 30 * xx, 40 + 0 * xx, 40 + 30 * yy], -1).astype(np.uint8)


BACKGROUND = _backdrop()
TRAIL = ((3, 0.2), (2, 0.4), (1, 0.65), (0, 1.0))  # (steps back, opacity) of the motion trail

IMAGE_ATTRS = {"colour": tuple(COLOURS), "position": POSITIONS, "size": tuple(SIZES)}
VIDEO_ATTRS = {"colour": tuple(COLOURS), "direction": tuple(DIRECTIONS), "size": tuple(VIDEO_SIZES)}
# Generation captions name two attributes (size varies freely and is not judged there).
CAPTION_ATTRS = {"image": ("colour", "position"), "video": ("colour", "direction")}
# Understanding questions ask for two of the three attributes, answered "value, value".
QUESTIONS = {
    ("colour", "position"): "What colour is the square and where is it?",
    ("colour", "size"): "What colour is the square and how big is it?",
    ("position", "size"): "Where is the square and how big is it?",
    ("colour", "direction"): "What colour is the square and which way does it move?",
    ("direction", "size"): "Which way does the square move and how big is it?",
}
GEN_SCALE, UND_SCALE = (1, 5), (1, 3)


def attrs_of(medium: str) -> dict:
    return IMAGE_ATTRS if medium == "image" else VIDEO_ATTRS


def sample_scene(medium: str, rng: np.random.Generator) -> dict:
    return {a: str(rng.choice(values)) for a, values in attrs_of(medium).items()}


def perturb(scene: dict, attrs, miss: list[bool], medium: str, rng) -> dict:
    """A copy of `scene` where each attribute in `attrs` flagged in `miss` takes another value."""
    out = dict(scene)
    for a, m in zip(attrs, miss):
        if m:
            out[a] = str(rng.choice([v for v in attrs_of(medium)[a] if v != scene[a]]))
    return out


def _apply_defect(frames: np.ndarray, defect: str | None, rng, strength: str = "world") -> np.ndarray:
    """frames: (T, H, W, 3) uint8. The world's defects are strong enough to see in an 8x8 patch, and in
    clips, which the model reads at half the size (32 px: the resize averages noise away and shrinks
    blur). With the milder ones a judge told clean from defective clips far less often (README, "Quality")."""
    sd, radius = STRENGTH[strength]
    if defect == "noise":
        noisy = frames.astype(np.float32) + rng.normal(0, sd, frames.shape)
        return noisy.clip(0, 255).astype(np.uint8)
    if defect == "blur":
        return np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(radius))) for f in frames])
    return frames


def render_image(scene: dict, defect: str | None, rng, strength: str = "world") -> np.ndarray:
    """(64, 64, 3) uint8: the square by its edge, centred along it and jittered so no two renderings are
    identical. Positions are one word ("at the top", "on the left"): with quadrants ("top left") the
    base's position checks stayed at 42-62% where one-word positions reached 80%+ (README). The square
    takes the backdrop's uneven light (up to +30 red to the right, +30 blue to the bottom): with it the
    judge's held-out figures rose on all eight (README, "lit squares")."""
    img = BACKGROUND.copy()
    side = SIZES[scene["size"]]
    along = PX // 2 - side // 2 + int(rng.integers(-8, 9))   # offset along the edge
    near = int(rng.integers(2, 7))                            # gap to the edge
    far = PX - side - near
    y, x = {"top": (near, along), "bottom": (far, along), "left": (along, near), "right": (along, far)}[scene["position"]]
    # the square is lit like the backdrop behind it, so its own patches carry where they are too
    light = BACKGROUND[y:y + side, x:x + side].astype(np.int16) - 40
    img[y:y + side, x:x + side] = np.clip(np.array(COLOURS[scene["colour"]], np.int16) + light, 0, 255)
    return _apply_defect(img[None], defect, rng, strength)[0]


def render_video(scene: dict, defect: str | None, rng, strength: str = "world") -> np.ndarray:
    """(8, 64, 64, 3) uint8: the square crossing the frame in its direction, from a random start.

    The square drags a fading trail of where it just was, so each frame shows which way it moves.
    Qwen2.5-VL's vision tower attends only within one temporal patch (2 frames), and without the
    trail a 2.5 px shift at the tiny model's 32 px video resolution stayed unlearned for 1.5k steps."""
    side, (dx, dy) = VIDEO_SIZES[scene["size"]], DIRECTIONS[scene["direction"]]
    travel = STEP * (FRAMES - 1)
    lo = lambda d: 2 + (travel if d < 0 else 0)              # start far enough from the edge it moves to
    hi = lambda d: PX - side - 2 - (travel if d > 0 else 0)
    x0, y0 = int(rng.integers(lo(dx), hi(dx) + 1)), int(rng.integers(lo(dy), hi(dy) + 1))
    colour = np.array(COLOURS[scene["colour"]], np.float32)
    frames = np.repeat(BACKGROUND[None], FRAMES, 0).astype(np.float32)
    for t in range(FRAMES):
        for back, alpha in TRAIL:                            # oldest first, the square itself last
            x = min(max(x0 + dx * STEP * (t - back), 0), PX - side)   # plain ints: np.clip on scalars took
            y = min(max(y0 + dy * STEP * (t - back), 0), PX - side)   # 60% of the time of a clean clip
            patch = frames[t, y:y + side, x:x + side]
            patch[:] = (1 - alpha) * patch + alpha * colour
    return _apply_defect(frames.round().astype(np.uint8), defect, rng, strength)


def render(medium: str, scene: dict, defect: str | None, rng, strength: str = "world") -> np.ndarray:
    return (render_image if medium == "image" else render_video)(scene, defect, rng, strength)


def where(position: str) -> str:
    return f"at the {position}" if position in ("top", "bottom") else f"on the {position}"


def caption(medium: str, scene: dict) -> str:
    """Generation prompt, e.g. 'a red square at the top' / 'a red square moving left'."""
    if medium == "image":
        return f"a {scene['colour']} square {where(scene['position'])}"
    return f"a {scene['colour']} square moving {scene['direction']}"


def description(medium: str, scene: dict) -> str:
    """Full description with every attribute (the base model's captioning target)."""
    if medium == "image":
        return f"a {scene['size']} {scene['colour']} square {where(scene['position'])}"
    return f"a {scene['size']} {scene['colour']} square moving {scene['direction']}"


def gen_score(n_right: int, clean: bool) -> int:
    """Ground-truth 1-5 score of a generated medium for a two-attribute caption.
    Nothing right scores 1 whatever the quality; otherwise each right attribute is worth 2 and a clean
    rendering 1 more, so a pair's label (more right attributes, then better quality) equals comparing scores."""
    return 1 if n_right == 0 else 2 * n_right + int(clean)


def generated_candidate(medium: str, scene: dict, rng, p_miss=0.5, p_defect=0.5):
    """What an imperfect text-to-image/video model might return for `scene`'s caption:
    each captioned attribute missed with p_miss, a quality defect with p_defect.
    Returns (pixels, truth) with truth = {scene, misses, defect, score}."""
    attrs = CAPTION_ATTRS[medium]
    miss = [bool(rng.random() < p_miss) for _ in attrs]
    shown = perturb(scene, attrs, miss, medium, rng)
    shown["size"] = str(rng.choice(list(attrs_of(medium)["size"])))   # size is free in generation
    defect = str(rng.choice(DEFECTS)) if rng.random() < p_defect else None
    truth = {"scene": shown, "misses": [a for a, m in zip(attrs, miss) if m], "defect": defect,
             "score": gen_score(len(attrs) - sum(miss), defect is None)}
    return render(medium, shown, defect, rng), truth


def question_for(medium: str, rng) -> tuple[str, tuple[str, str]]:
    pairs = [k for k in QUESTIONS if all(a in attrs_of(medium) for a in k)]
    asked = pairs[int(rng.integers(len(pairs)))]
    return QUESTIONS[asked], asked


def answer_text(scene: dict, asked) -> str:
    return ", ".join(scene[a] for a in asked)


def candidate_answer(medium: str, scene: dict, asked, n_right: int, rng) -> str:
    """An answer with exactly `n_right` of the two asked attributes right; wrong values drawn uniformly."""
    wrong = list(rng.permutation([False] * n_right + [True] * (len(asked) - n_right)))
    return answer_text(perturb(scene, asked, wrong, medium, rng), asked)


def malform(answer: str, scene: dict, asked, medium: str, rng) -> str:
    """The answer in a wrong form, as sampled policy answers often are (the base also learnt to describe):
    a wrong slot takes a word of another kind ("red, small" to "what colour and where"), or an answer
    with nothing right gives the asked values, right or not, and then one that was not asked ("red, top,
    large"). The number right, and so the label and score, stays valid: the other-kind word replaces a
    value that was already wrong, and the grader (03's n_right) counts an answer with more values than
    asked as 0 right, which the long form only ever replaces. A fully right answer is returned as it is."""
    values = answer.split(", ")
    wrong = [i for i, (v, a) in enumerate(zip(values, asked)) if v != scene[a]]
    if len(wrong) == len(asked) and rng.random() < 0.5:
        extra = next(a for a in attrs_of(medium) if a not in asked)
        values = [scene[a] if rng.random() < 0.5 else v for a, v in zip(asked, values)]
        values.append(scene[extra] if rng.random() < 0.5 else str(rng.choice(attrs_of(medium)[extra])))
    elif wrong:
        k = int(rng.choice(wrong))
        values[k] = str(rng.choice([w for w in WORDS if w not in attrs_of(medium)[asked[k]]]))
    return ", ".join(values)


def malform_answers(records: list[dict], truths: list[dict], share: float, rng) -> int:
    """Rewrite a `share` of the understanding answers in place with `malform`; returns how many changed.
    Training records only: the text alone gives these answers away, so in the held-out records they would
    lift the no-pixels control above chance."""
    changed = 0
    for r, t in zip(records, truths):
        if not r["task"].endswith("understanding"):
            continue
        medium = r["task"].split("_")[0]
        new = [malform(a, t["scene"], t["asked"], medium, rng) if rng.random() < share else a for a in r["responses"]]
        if new != r["responses"]:
            changed += sum(a != b for a, b in zip(new, r["responses"]))
            r["responses"] = new
            r["question"] = common.render_question(r["task"], r["kind"], r["prompt"], new, r["scale"])
    return changed


def judge_example(task: str, kind: str, rng, tie_keep: float = 0.4):
    """One judge training example with its ground truth: (fields, media pixels, truth).

    fields are the unified record's structured fields (prompt, responses, label, score, scale).
    Generation pairs are two independent candidates for one caption; about 10% end up as true ties.
    Understanding pairs never tie: the two answers have different numbers of right attributes.
    """
    medium = "image" if task.startswith("image") else "video"
    scene = sample_scene(medium, rng)
    if task.endswith("generation"):
        while True:
            cands = [generated_candidate(medium, scene, rng) for _ in range(2 if kind == "pairwise" else 1)]
            scores = [t["score"] for _, t in cands]
            if kind == "pointwise" or scores[0] != scores[1] or rng.random() < tie_keep:
                break
        fields = {"prompt": caption(medium, scene), "responses": []}
        media = [px for px, _ in cands]
        truth = {"scene": scene, "candidates": [t for _, t in cands]}
    else:
        question, asked = question_for(medium, rng)
        rights = [int(x) for x in rng.choice(3, size=2, replace=False)] if kind == "pairwise" \
            else [int(rng.integers(3))]
        fields = {"prompt": question, "responses": [candidate_answer(medium, scene, asked, n, rng) for n in rights]}
        media = [render(medium, scene, None, rng)]
        scores = [UND_SCALE[0] + n for n in rights]
        truth = {"scene": scene, "asked": list(asked), "n_right": rights}
    if kind == "pairwise":
        fields.update(label=0 if scores[0] == scores[1] else (1 if scores[0] > scores[1] else 2),
                      score=None, scale=None)
    else:
        fields.update(label=None, score=scores[0], scale=list(GEN_SCALE if task.endswith("generation") else UND_SCALE))
    return fields, media, truth


# ---------------------------------------------------------------------------------------------
# writing the toy data set
#
# runs/toy/data/
#   reward_train.jsonl, reward_test.jsonl   unified judge records, all four tasks x pairwise/pointwise
#   prompts_train.jsonl, prompts_test.jsonl  understanding questions for the policy, with the true answer
#   gen_candidates.jsonl                     generation prompts with 10 candidates each (stage 03 input)
#   media/                                   png pictures and mp4 clips

TASK_CODE = {"image_generation": "ig", "image_understanding": "iu", "video_generation": "vg",
             "video_understanding": "vu"}


class MediaWriter:
    """Writes pictures (png) and clips (mp4, read back with decord) under data/media/, and refuses to
    reuse pixels already written to another split, so train, test and policy prompts stay disjoint.
    A context manager: clips are encoded in a second process while this one draws the next examples
    (encoding was 60% of the data's time). At most 64 clips wait in the queue; leaving the `with` block
    waits for the last clip and re-raises any error the encoder met (after an error in the block itself,
    the queued clips are dropped instead)."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.owner: dict[str, str] = {}   # pixel hash -> split that first used it
        self.encoder = concurrent.futures.ProcessPoolExecutor(1)
        self.pending: list[concurrent.futures.Future] = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                for job in self.pending:
                    job.result()
        finally:
            self.encoder.shutdown(cancel_futures=exc_type is not None)

    def fresh(self, pixels: np.ndarray, split: str) -> bool:
        h = hashlib.sha1(pixels.tobytes()).hexdigest()
        return self.owner.setdefault(h, split) == split

    def write(self, pixels: np.ndarray, rel: str) -> str:
        path = self.data_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if pixels.ndim == 3:
            Image.fromarray(pixels).save(path)
        else:
            if len(self.pending) >= 64:      # bound the pixels held in the queue
                self.pending.pop(0).result()
            self.pending.append(self.encoder.submit(write_mp4, pixels, path))
        return rel


def write_mp4(frames: np.ndarray, path, fps: int = 8) -> None:
    """(T, H, W, 3) uint8 -> lossless H.264 mp4 in 4:4:4 chroma: decord reads back the pixels to within
    the +-2 of the colour conversion, so colours, noise and the motion trail survive exactly, and the
    same seed gives the same pixels. (Lossy encoding made the decoded pixels of identical clips differ
    from run to run by up to 28 levels; the numpy RGB -> YUV conversion avoids FFmpeg's converter,
    whose rounding depends on buffer alignment.) The ultrafast preset is still lossless at qp 0 and
    encoded 1.4x faster than the default one."""
    import av
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt, stream.options = "yuv444p", {"qp": "0", "preset": "ultrafast", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv444(frame), format="yuv444p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def rgb_to_yuv444(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (3, H, W) Y'CbCr, BT.601 limited range (what decoders assume when untagged)."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return np.stack([y, cb, cr]).round().clip(0, 255).astype(np.uint8)


def ext(medium: str) -> str:
    return "png" if medium == "image" else "mp4"


def write_reward_split(split: str, n: int, rng, writer: MediaWriter) -> tuple[list[dict], list[dict]]:
    """n judge records per task and kind, in the unified format (DESIGN.md section 4), and the ground
    truth behind each (scene, asked attributes, number right)."""
    records, truths = [], []
    for task in common.TASKS:
        medium, code = task.split("_")[0], TASK_CODE[task]
        for kind in common.KINDS:
            for i in range(n):
                while True:   # redraw the rare example whose pixels another split already uses
                    fields, media, truth = judge_example(task, kind, rng)
                    if all(writer.fresh(m, split) for m in media):
                        break
                rid = f"toy-{code}-{split}-{kind[:4]}-{i:05d}"
                paths = [writer.write(m, f"media/{code}/{rid}_{k}.{ext(medium)}") for k, m in enumerate(media)]
                records.append(toy_record(rid, task, kind, paths, fields))
                truths.append(truth)
    return records, truths


def toy_record(rid: str, task: str, kind: str, paths: list[str], fields: dict) -> dict:
    """A unified record (DESIGN.md section 4) from judge_example's fields and the written media."""
    return {"id": rid, "source": "toy", "task": task, "kind": kind, "media": paths, **fields,
            "question": common.render_question(task, kind, fields["prompt"], fields["responses"], fields["scale"]),
            "answer": common.render_answer(task, kind, fields["label"], fields["score"])}


def write_policy_prompts(split: str, n: int, rng, writer: MediaWriter) -> list[dict]:
    """Understanding questions the policy answers (stage 03 samples them, 05 scores them)."""
    rows = []
    for task in ("image_understanding", "video_understanding"):
        medium, code = task.split("_")[0], TASK_CODE[task]
        for i in range(n):
            while True:
                scene = sample_scene(medium, rng)
                pixels = render(medium, scene, None, rng)
                if writer.fresh(pixels, split):
                    break
            question, asked = question_for(medium, rng)
            rid = f"toy-{code}-prompt-{split}-{i:05d}"
            rows.append({"id": rid, "task": task, "media": [writer.write(pixels, f"media/{code}/{rid}.{ext(medium)}")],
                         "question": question, "answer": answer_text(scene, asked), "scene": scene,
                         "asked": list(asked)})
    return rows


def write_gen_candidates(n: int, n_cand: int, rng, writer: MediaWriter) -> list[dict]:
    """Generation prompts with the samples of an imperfect toy generator (stage 03 ranks and sifts them).
    Format any text-to-image/video model can write: {"id", "task", "prompt", "media": [paths]};
    the toy adds "truth": the ground-truth score of each candidate, for measuring pair precision."""
    rows = []
    for task in ("image_generation", "video_generation"):
        medium, code = task.split("_")[0], TASK_CODE[task]
        for i in range(n):
            scene = sample_scene(medium, rng)
            rid = f"toy-{code}-gen-{i:05d}"
            media, truth = [], []
            for k in range(n_cand):
                pixels, t = generated_candidate(medium, scene, rng)
                writer.fresh(pixels, "gen")
                media.append(writer.write(pixels, f"media/{code}/{rid}_{k}.{ext(medium)}"))
                truth.append(t["score"])
            rows.append({"id": rid, "task": task, "prompt": caption(medium, scene), "media": media, "truth": truth})
    return rows


# ---------------------------------------------------------------------------------------------
# the tiny base model: a stand-in for downloading a pretrained VLM
#
# A real run starts from a checkpoint that already sees (Qwen2.5-VL-3B-Instruct). Here we build a tiny
# Qwen2.5-VL from random weights and teach it to describe pictures and clips and to answer questions
# about them, briefly: it perceives the toy world but stays an imperfect answerer, so the later stages
# have something to improve.

def base_example(rng, qa_share: float, verify_share: float, multi_share: float, defect_share: float = 0.3,
                 strength: str = "world", compare: float = 0.0):
    """One pretraining example: (medium kind, [pixels per medium], question, answer, [words each shows]).
    Three kinds, as a generic VLM is trained on: descriptions (naming quality defects too, "..., noisy"),
    the two-attribute questions the policy will face, and yes/no checks, half of one attribute ("Is the
    square red?"), half of a whole caption ("Is it a red square at the top?": yes only when both named
    attributes are right). Measured: with caption checks the base checks two attributes at once (94%)
    and a judge learns two-attribute scores from it (see the README); with one-attribute checks only,
    judges learned one of the two attributes and stalled. A `multi_share` of the examples shows two
    pictures or two clips and asks about one of them, or (a `compare` share of those) which of them
    fits a caption (see multi_example)."""
    medium = "image" if rng.random() < 0.5 else "video"
    if rng.random() < multi_share:
        return multi_example(medium, rng, defect_share, strength, compare)
    scene = sample_scene(medium, rng)
    defect = str(rng.choice(DEFECTS)) if rng.random() < defect_share else None
    pixels = render(medium, scene, defect, rng, strength)
    shown = " ".join(scene.values()) + (f" {DEFECT_WORDS[defect]}" if defect else "")
    u = rng.random()
    if u < qa_share:
        question, asked = question_for(medium, rng)
        return medium, [pixels], question, answer_text(scene, asked), [shown]
    if u < qa_share + verify_share:
        if rng.random() < 0.5:
            return medium, [pixels], *caption_check(medium, scene, rng), [shown]
        attr = str(rng.choice(list(attrs_of(medium))))
        yes = bool(rng.random() < 0.5)
        value = scene[attr] if yes else str(rng.choice([v for v in attrs_of(medium)[attr] if v != scene[attr]]))
        return medium, [pixels], check_question(attr, value), "yes" if yes else "no", [shown]
    return medium, [pixels], DESCRIBE[medium], described(medium, scene, defect), [shown]


def multi_example(medium: str, rng, defect_share: float, strength: str = "world", compare: float = 0.0):
    """Two pictures (or clips) of similar scenes, one of them addressed by its label: "Describe Picture 2."
    or "Is Video 1 a red square moving left?". Real VLMs are pretrained on multi-image data; a pairwise
    judge needs exactly this, to check each of two candidates against one caption. The second scene
    differs from the first in each captioned attribute with probability 1/2, so the answer depends on
    which medium is addressed.
    With probability `compare` it asks instead which of the two fits a caption that exactly one of them
    fits ("Which video shows a red square moving left?" -> "Video 2"): the comparison itself."""
    attrs = CAPTION_ATTRS[medium]
    comparing = bool(compare) and rng.random() < compare   # no draw at all when compare is 0
    first = sample_scene(medium, rng)
    if comparing:   # the other scene misses one or both captioned attributes
        miss = [[True, False], [False, True], [True, True]][int(rng.integers(3))]
    else:
        miss = [bool(rng.random() < 0.5) for _ in attrs]
    scenes = [first, perturb(first, attrs, miss, medium, rng)]
    scenes[1]["size"] = str(rng.choice(list(attrs_of(medium)["size"])))
    if comparing:
        flip = int(rng.integers(2)) == 1
    else:
        flip = rng.random() < 0.5
    if flip:
        scenes.reverse()
    defects = [str(rng.choice(DEFECTS)) if rng.random() < defect_share else None for _ in scenes]
    pixels = [render(medium, sc, d, rng, strength) for sc, d in zip(scenes, defects)]
    shown = [" ".join(sc.values()) + (f" {DEFECT_WORDS[d]}" if d else "") for sc, d in zip(scenes, defects)]
    word = "Picture" if medium == "image" else "Video"
    if comparing:
        question = f"Which {word.lower()} shows {caption(medium, first)}?"
        return medium, pixels, question, f"{word} {2 if flip else 1}", shown
    k = int(rng.integers(2))
    label = f"{word} {k + 1}"
    if rng.random() < 0.5:
        return medium, pixels, f"Describe {label}.", described(medium, scenes[k], defects[k]), shown
    return medium, pixels, *caption_check(medium, scenes[k], rng, label), shown


def caption_check(medium: str, scene: dict, rng, subject: str = "it") -> tuple[str, str]:
    """(question, yes/no) checking a caption against `scene`; each captioned attribute is named wrong
    with probability 0.3, so about half the answers are "yes"."""
    attrs = CAPTION_ATTRS[medium]
    miss = [bool(rng.random() < 0.3) for _ in attrs]
    named = perturb(scene, attrs, miss, medium, rng)
    return caption_question(medium, named, subject), "no" if any(miss) else "yes"


DEFECT_WORDS = {"noise": "noisy", "blur": "blurry"}
# every word the world's attributes and defects are named with (each one token: see grounding_targets)
WORDS = sorted({w for attrs in (IMAGE_ATTRS, VIDEO_ATTRS) for vals in attrs.values() for v in vals
                for w in v.split()} | set(DEFECT_WORDS.values()))
VERIFY = {"colour": "Is the square {}?", "position": "Is the square {}?", "size": "Is the square {}?",
          "direction": "Does the square move {}?"}


def check_question(attr: str, value: str) -> str:
    """A yes/no check of one attribute: 'Is the square red?', 'Is the square on the left?'."""
    return VERIFY[attr].format(where(value) if attr == "position" else value)


def caption_question(medium: str, scene: dict, subject: str = "it") -> str:
    """A yes/no check of a whole caption: 'Is it a red square at the top?', 'Is Picture 2 a ...?'."""
    return f"Is {subject} {caption(medium, scene)}?"


def described(medium: str, scene: dict, defect: str | None) -> str:
    """The description target: 'a small red square at the top', plus ', noisy' for a defect."""
    return description(medium, scene) + (f", {DEFECT_WORDS[defect]}" if defect else "")


DESCRIBE = {"image": "Describe the picture.", "video": "Describe the video."}


def as_media(medium: str, pixels: np.ndarray):
    """Pixels as the objects the processor takes: a PIL image or a common.Video (8 frames at 8 fps)."""
    return Image.fromarray(pixels) if medium == "image" else common.Video(pixels, fps=float(FRAMES))


def toy_corpus(records, prompts, gen_rows) -> list[str]:
    """Every text the toy world produces, for training the tiny tokenizer."""
    texts = [r["question"] for r in records] + [r["answer"] for r in records]
    texts += [p["question"] for p in prompts] + [p["answer"] for p in prompts] + [g["prompt"] for g in gen_rows]
    texts += list(DESCRIBE.values()) + [f", {w}" for w in DEFECT_WORDS.values()] + ["yes", "no"]
    texts += [caption_question("image", {"colour": c, "position": p}) for c in COLOURS for p in POSITIONS]
    texts += [f"Describe {label} {k}." for label in ("Picture", "Video") for k in (1, 2)]
    texts += [caption_question(medium, {"colour": c, "position": "top", "direction": "up"}, f"{label} {k}")
              for medium, label in (("image", "Picture"), ("video", "Video")) for c in COLOURS for k in (1, 2)]
    texts += [check_question(a, v) for medium in ("image", "video") for a, vals in attrs_of(medium).items()
              for v in vals]
    for medium in ("image", "video"):
        for colour in COLOURS:
            scene = {**{a: v[0] for a, v in attrs_of(medium).items()}, "colour": colour}
            texts.append(description(medium, scene))
    for task in common.TASKS:   # every verdict the judge can give, whatever the data happens to contain
        for kind in common.KINDS:
            texts += [a for _, a in common.verdict_candidates(task, kind, (0, 9))]
    return texts


class VisualTokens:
    """Captures the merged visual tokens (the vision tower's output, in the language model's embedding
    space) during the ordinary forward pass, so the grounding loss below costs no extra vision pass."""

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
    for w in WORDS:
        tok = processor.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        assert len(tok) == 1, f"attribute word {w!r} is not one token"
        ids.append(tok[0])
    target = torch.tensor([[float(w in shown.split()) for w in WORDS] for shown in shown_in_order])
    return ids, target


def pretrain_base(cfg, corpus, out_dir: Path, on_step=None):
    """Build the tiny VLM and pretrain it on descriptions and questions (a plain loop; stage 02 has the
    full-featured one). Deterministic on CPU for a given seed, machine and number of threads (each
    of these changes the order in which kernels add numbers, and so the weights; README, Results);
    bf16 kernels on CUDA are not deterministic.

    Besides the usual answer cross-entropy, a grounding loss asks the mean visual token of each medium
    to name the medium's attributes through the (tied) language-model head. Real VLMs come with visual
    tokens that already sit near the words for what they show (LLaVA trains its projector for exactly
    that); from random weights that alignment is what makes cross-modal comparison learnable. Measured:
    "Is the square red?" went from chance after 1500 steps to 100% after 500 with it.

    on_step(phase name, step, model, processor), if given, runs after every optimizer step
    (tools/check_curve.py probes the checks with it)."""
    common.set_seed(cfg.seed)
    device = common.get_device()     # fp32 weights; on CUDA the forward runs under bf16 autocast
    model, processor = common.build_tiny_vlm(corpus, cfg.seed, dict(common.TINY, text_layers=cfg.text_layers))
    model.to(device)
    visual = VisualTokens(model)
    pad = processor.tokenizer.pad_token_id
    t0 = time.time()
    # Two phases, as VLM recipes end on a smaller, curated stage. First the general mix, with milder
    # defects than the world's. Then the same mix with the world's defects in half the media instead of
    # 30%, at a lower rate. Each phase has its own optimizer, schedule and random stream.
    # The general phase alone never learnt to see defects (quality-only pairs at chance for every judge).
    # The second phase teaches them and sharpens the checks (README, "Quality: a second pretraining phase").
    # The first phase is kept exactly as it was tuned, because any change to it re-draws how well the
    # base checks (measured: with the world's defects, 2,000, 1,400 and 1,200 steps all left position or
    # direction checks near chance; README).
    # The second phase asks fewer of the policy's questions (`quality_qa_share`): the base stays an
    # imperfect answerer, so DPO has work to do.
    # (name, steps, peak lr, warmup, share of policy questions, share of defective media, defect strength,
    #  random stream, share of two-media examples that compare)
    phases = [("base", cfg.base_steps, cfg.base_lr, 100, cfg.base_qa_share, 0.3, "mild", [cfg.seed, 7], 0.0),
              ("quality", cfg.quality_steps, cfg.quality_lr, 50, cfg.quality_qa_share, cfg.quality_defects, "world",
               [cfg.seed, 77], cfg.quality_compare)]
    for name, steps, peak, warmup, qa_share, defects, strength, stream, compare in phases:
        optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0, foreach=True)
        rng = np.random.default_rng(stream)
        model.train()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = common.lr_at(step, steps, peak, warmup)
            examples = [base_example(rng, qa_share, cfg.base_verify_share, cfg.base_multi_share, defects, strength,
                                     compare)
                        for _ in range(cfg.base_batch)]
            encoded = common.encode_many(processor, [([as_media(m, px) for px in pixels], q, a)
                                                     for m, pixels, q, a, _ in examples])
            batch = common.to_device(common.collate(encoded, pad), device)
            shown = [w for kind in ("image", "video") for e in examples if e[0] == kind for w in e[4]]
            ids, target = grounding_targets(processor, shown)
            with common.autocast(device):
                ce = -common.answer_token_logps(model, batch)[0].mean()     # cross-entropy on the answer tokens
                logits = model.lm_head(visual.pooled(batch))[:, ids].float()  # (n_media, K)
            ground = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.to(device))
            loss = ce + cfg.base_ground * ground
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step:
                on_step(name, step + 1, model, processor)
                visual.outputs.clear()    # drop what the hook saw in on_step's own forward passes
            if (step + 1) % 250 == 0 or step + 1 == steps:
                print(f"  {name} step {step + 1}/{steps}  answer loss {ce.item():.3f}  "
                      f"grounding {ground.item():.3f}  {time.time() - t0:.0f}s")
    model.eval()
    model.cpu()
    common.save_checkpoint(model, processor, out_dir)
    return model, processor


# ---------------------------------------------------------------------------------------------
# the released training data (../shared/FORMATS.md), mapped to the same unified records
#
# dataset/<Source>/[pairwise|pointwise/]train_data.json: a JSON list in the LLaVA conversation format
#   {"id", "image": "a.png" | [..], "images": [..] (more than 2 = frames of clips), "video": "x.mp4",
#    "conversations": [{"from": "human", "value": "<image>\n...prompt"}, {"from": "gpt", "value": "...verdict"}]}
# or the LLaMA-Factory copy: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "images": [..]}.

# source folder -> (task, kind, score scale, media folder inside the source)
SOURCES = {
    "EvalMuse/pairwise": ("image_generation", "pairwise", None, "images"),
    "EvalMuse/pointwise": ("image_generation", "pointwise", (1, 5), "images"),
    "HPD": ("image_generation", "pairwise", None, ""),
    "OIP": ("image_generation", "pairwise", None, ""),
    "LLaVA-critic/pairwise": ("image_understanding", "pairwise", None, ""),
    "LLaVA-critic/pointwise": ("image_understanding", "pointwise", (0, 100), ""),
    "VideoDPO": ("video_generation", "pairwise", None, ""),
    "LiFT-HRA": ("video_generation", "pointwise", (1, 10), ""),
    "VideoFeedback": ("video_generation", "pointwise", (1, 10), "frames"),
    "ShareGPTVideo/pairwise": ("video_understanding", "pairwise", None, "videos"),
    "ShareGPTVideo/pointwise": ("video_understanding", "pointwise", (1, 5), "videos"),
}
# the authors' mix (their train_data.yaml): every source in full except these two
AUTHORS_MIX = {"LLaVA-critic/pointwise": "random:25000", "OIP": "random:25000"}


class Unmappable(ValueError):
    """A released record that cannot be turned into a unified record; skipped, counted and named."""


def conversation(raw: dict) -> tuple[str, str]:
    """(human prompt, judge answer) from either released layout."""
    if "conversations" in raw:
        turns = {t.get("from"): t.get("value") for t in raw["conversations"]}
        human, gpt = turns.get("human"), turns.get("gpt")
    elif "messages" in raw:
        turns = {t.get("role"): t.get("content") for t in raw["messages"]}
        human, gpt = turns.get("user"), turns.get("assistant")
    else:
        raise Unmappable("no conversations/messages")
    if not isinstance(human, str) or not isinstance(gpt, str):
        raise Unmappable("malformed conversation: needs one human and one gpt turn")
    return human, gpt


def released_media(raw: dict, task: str, kind: str) -> tuple[list, int]:
    """The record's media as unified entries (a path, or a list of frame paths for a clip), and the
    number of files named. Frame lists: a pair of clips is split in two halves."""
    files = []
    for key in ("image", "images", "video", "videos"):
        v = raw.get(key)
        files += [v] if isinstance(v, str) else list(v or [])
    n_media = 2 if kind == "pairwise" and task.endswith("generation") else 1
    if task.startswith("video") and len(files) > n_media and not any(common.is_video(f) for f in files):
        if len(files) % n_media:
            raise Unmappable(f"{len(files)} frames cannot be split into {n_media} clips")
        k = len(files) // n_media
        return [files[i * k:(i + 1) * k] for i in range(n_media)], len(files)
    if len(files) != n_media:
        raise Unmappable(f"expected {n_media} media for {task} {kind}, found {len(files)}")
    return files, len(files)


def structured_fields(human: str, task: str) -> tuple[str, list[str]]:
    """Best-effort caption/question and the judged answers from the released prompt wording, used to
    re-render the pair in the other order at evaluation time; empty when the wording differs."""
    if task.endswith("generation"):
        m = re.search(r"Text (?:Caption|Prompt): \[(.*?)\]", human, re.S)
        return (m.group(1) if m else ""), []
    q = re.search(r"Question: \[?(.*?)\]?\n", human, re.S)
    answers = re.findall(r"(?:Answer [12]|Response [12]|The (?:first|second) response|Response): \[?(.*?)\]?(?:\n|$)",
                         human, re.S)
    return (q.group(1).strip() if q else ""), [a.strip() for a in answers]


def to_unified(raw: dict, source: str, media_root: Path, data_dir: Path, index: int) -> dict:
    """One released record -> one unified record (raises Unmappable with the reason)."""
    task, kind, scale, _ = SOURCES[source]
    human, gpt = conversation(raw)
    media, n_files = released_media(raw, task, kind)
    placeholders = human.count("<image>") + human.count("<video>")
    if placeholders > n_files:
        raise Unmappable(f"{placeholders} <image> placeholders but {n_files} media")
    verdict = common.parse_verdict(gpt, task, kind, scale)
    if verdict is None:
        if kind == "pointwise" and re.search(r"Final Score:\s*-?\d", gpt):
            raise Unmappable(f"score outside scale {scale}: {gpt[-40:]!r}")
        raise Unmappable(f"no {kind} verdict in the answer: {gpt[-60:]!r}")
    rel = lambda p: os.path.relpath(media_root / p, data_dir)
    prompt, responses = structured_fields(human, task)
    return {"id": f"{source.replace('/', '-')}-{raw.get('id', index)}", "source": source, "task": task,
            "kind": kind, "media": [[rel(f) for f in m] if isinstance(m, list) else rel(m) for m in media],
            "prompt": prompt, "responses": responses,
            "label": verdict if kind == "pairwise" else None, "score": verdict if kind == "pointwise" else None,
            "scale": list(scale) if scale else None,
            "question": re.sub(r"\s*<(image|video)>\s*", " ", human).strip(), "answer": gpt}


def parse_mix(mix: str) -> dict[str, str]:
    """'all', 'authors', 'HPD=all,OIP=random:5000', or a yaml file in the authors' format
    (datasets: [{json_path: dataset/OIP/train_data.json, sampling_strategy: random:25000}, ...])."""
    if mix == "all":
        return {s: "all" for s in SOURCES}
    if mix == "authors":
        return {s: AUTHORS_MIX.get(s, "all") for s in SOURCES}
    if Path(mix).is_file():
        import yaml
        out = {}
        for d in yaml.safe_load(Path(mix).read_text())["datasets"]:
            src = str(Path(d["json_path"]).parent).split("dataset/")[-1]
            out[src] = d.get("sampling_strategy", "all")
        return out
    return dict(part.split("=") for part in mix.split(","))


def sample(items: list, strategy: str, rng) -> list:
    if strategy == "all":
        return items
    kind, _, n = strategy.partition(":")
    if kind != "random" or not n.isdigit():
        raise ValueError(f"unknown sampling strategy {strategy!r} (use all or random:N)")
    idx = sorted(rng.permutation(len(items))[:int(n)])
    return [items[i] for i in idx]


def write_released(cfg, data_dir: Path) -> list[dict]:
    """Map every released source in the mix to unified records; returns them (train and test)."""
    root = Path(cfg.data_dir)
    if not root.is_dir():                        # a hub id: download when a network is there
        from huggingface_hub import snapshot_download
        root = Path(snapshot_download(cfg.data_dir, repo_type="dataset"))
    if (root / "dataset").is_dir():
        root = root / "dataset"
    skips = common.SkipLog(data_dir / "skipped.jsonl")
    mix = parse_mix(cfg.mix)
    found = sorted(str(p.parent.relative_to(root)) for p in root.rglob("train_data.json"))
    for src in found:
        if src not in SOURCES:
            skips.add(root / src / "train_data.json", None, f"unknown source folder: {src}")
    rng = np.random.default_rng(cfg.seed)
    records = []
    for src in [s for s in found if s in SOURCES and s in mix]:
        path = root / src / "train_data.json"
        try:
            raw = json.loads(path.read_text())
        except ValueError as e:
            skips.add(path, None, f"malformed json: {e}")
            continue
        if not isinstance(raw, list):
            skips.add(path, None, f"malformed json: top level is {type(raw).__name__}, not a list")
            continue
        media_root = root / src.split("/")[0] / SOURCES[src][3]
        kept = []
        for i, r in enumerate(raw):
            try:
                if not isinstance(r, dict):
                    raise Unmappable("record is not an object")
                rec = to_unified(r, src, media_root, data_dir, i)
                why = common.check_record(rec, data_dir)
                if why:
                    raise Unmappable(why)
                kept.append(rec)
            except Unmappable as e:
                skips.add(path, r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}", str(e))
        records += sample(kept, mix[src], rng)
    print(released_table(records))
    print(skips.summary())
    return records


def released_table(records) -> str:
    """Records per source, task and kind."""
    lines = ["| source | task | kind | records |", "|---|---|---|---|"]
    for src in SOURCES:
        rs = [r for r in records if r["source"] == src]
        if rs:
            lines.append(f"| {src} | {rs[0]['task']} | {rs[0]['kind']} | {len(rs)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    out_dir: str = "runs/toy"        # data/ and base/ are written under this folder
    data_dir: str = ""               # released data (folder with dataset/<Source>/..., or a hub id); empty = toy
    mix: str = "authors"             # released data: all, authors, SRC=all|random:N,..., or the authors' yaml
    test_share: float = 0.01         # released data: share held out as reward_test.jsonl
    seed: int = 0                    # one seed for the whole toy world and the base model
    train_per_group: int = 1000      # judge training records per task and kind (x8 groups)
    test_per_group: int = 150        # held-out judge records per task and kind
    malformed: float = 0.2           # share of training understanding answers rewritten in the wrong form
    policy_train: int = 200          # understanding questions per medium for stage 03 (sampling + DPO)
    policy_test: int = 200           # held-out understanding questions per medium for stage 05
    gen_prompts: int = 60            # generation prompts per medium with candidates for stage 03
    gen_candidates: int = 10         # candidates per generation prompt (the paper samples N=10)
    base_steps: int = 2000           # pretraining steps of the tiny base model (0 = skip building it)
    base_batch: int = 16             # pretraining batch size
    base_lr: float = 1e-3            # pretraining peak learning rate
    base_qa_share: float = 0.03      # share of two-attribute questions (the policy's task): kept small so
                                     # the base answers them imperfectly (72-88% right) and DPO has work to do
    base_verify_share: float = 0.6   # share of yes/no checks (the rest is description): checking a word
                                     # against the pixels is what a judge needs and what plateaus
    base_multi_share: float = 0.15   # share of two-picture / two-clip examples asking about one of them
    text_layers: int = 4             # language-model layers of the tiny model (4 checked colour reliably, 2 not)
    base_ground: float = 1.0         # weight of the grounding loss on visual tokens (see pretrain_base)
    quality_steps: int = 800         # second pretraining phase, defects in half the media (0 = none; see pretrain_base)
    quality_lr: float = 5e-4         # its peak learning rate
    quality_defects: float = 0.5     # its share of noisy or blurry media (the first phase: 0.3)
    quality_qa_share: float = 0.01   # its share of the policy's questions: with 0.03 the base answered 95.5% of the
                                     # picture questions and DPO had nothing to gain; with 0 it forgot them (68%)
    quality_compare: float = 0.0     # its share of two-media examples asking which one fits a caption (multi_example);
                                     # 0.5 helped two judges on one base (session 11), not on another draw of
                                     # the same recipe (one thread instead of two; README, session 12)


def main(cfg: Config) -> None:
    t0 = time.time()
    out = Path(cfg.out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if cfg.data_dir:   # the released data: map, mix, hold out a test share; no toy world, no tiny base
        records = write_released(cfg, data)
        order = np.random.default_rng(cfg.seed).permutation(len(records))
        n_test = int(round(cfg.test_share * len(records)))
        common.write_jsonl(data / "reward_test.jsonl", [records[i] for i in order[:n_test]])
        common.write_jsonl(data / "reward_train.jsonl", [records[i] for i in order[n_test:]])
        print(f"{len(records) - n_test} train / {n_test} test records -> {data}  ({time.time() - t0:.0f}s)")
        return
    with MediaWriter(data) as writer:
        rows, corpus, n_bad = toy_world(cfg, writer)
    for name, split in rows.items():
        common.write_jsonl(data / f"{name}.jsonl", split)
    train, test = rows["reward_train"], rows["reward_test"]
    print(f"toy world: {len(train)} train / {len(test)} test judge records, "
          f"{len(rows['prompts_train'])} + {len(rows['prompts_test'])} policy questions, "
          f"{len(rows['gen_candidates'])} generation prompts ({n_bad} training answers in the wrong form) "
          f"-> {data}  ({time.time() - t0:.0f}s)")
    print(count_table(train + test))
    if cfg.base_steps > 0:
        print(f"pretraining the tiny base model ({cfg.base_steps} + {cfg.quality_steps} steps) -> {out / 'base'}")
        pretrain_base(cfg, corpus, out / "base")
    print(f"done in {time.time() - t0:.0f}s")


def toy_world(cfg, writer) -> tuple[dict[str, list[dict]], list[str], int]:
    """Draw the whole toy world, its media through `writer`: ({file name: rows}, the tokenizer's corpus,
    number of training answers rewritten in the wrong form)."""
    # one random stream per split, so changing one split's size leaves the others unchanged
    stream = lambda name: np.random.default_rng([cfg.seed, sum(map(ord, name))])
    train, train_truth = write_reward_split("train", cfg.train_per_group, stream("reward-train"), writer)
    test, _ = write_reward_split("test", cfg.test_per_group, stream("reward-test"), writer)
    prompts_train = write_policy_prompts("train", cfg.policy_train, stream("prompts-train"), writer)
    prompts_test = write_policy_prompts("test", cfg.policy_test, stream("prompts-test"), writer)
    gen = write_gen_candidates(cfg.gen_prompts, cfg.gen_candidates, stream("gen"), writer)
    # The tokenizer (and with it the base, the stand-in for a downloaded checkpoint) is trained on the
    # world's texts before some training answers are rewritten as policies write them: the same words in
    # other orders, which would only reshuffle the tokenizer's merges, and so the base, with the judge's mix.
    corpus = toy_corpus(train + test, prompts_train + prompts_test, gen)
    n_bad = malform_answers(train, train_truth, cfg.malformed, stream("malformed"))
    rows = {"reward_train": train, "reward_test": test, "prompts_train": prompts_train,
            "prompts_test": prompts_test, "gen_candidates": gen}
    return rows, corpus, n_bad


def count_table(records) -> str:
    """Records per task and kind, with the share of tied pairs."""
    lines = ["| task | pairwise | (ties) | pointwise |", "|---|---|---|---|"]
    for task in common.TASKS:
        pair = [r for r in records if r["task"] == task and r["kind"] == "pairwise"]
        point = [r for r in records if r["task"] == task and r["kind"] == "pointwise"]
        lines.append(f"| {task} | {len(pair)} | {sum(r['label'] == 0 for r in pair)} | {len(point)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__))

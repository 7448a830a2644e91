"""The toy world: everything that defines it, and nothing of the method.

Synthetic 64x64 pictures and 8-frame clips of one coloured square whose ground truth is known, so
every stage of the pipeline can be checked against the truth. This module draws scenes, renders them,
words captions, questions and answers, scores candidates by fixed rules, rewrites answers in the wrong
form as sampled policies write them, and writes the toy data set that 01_prepare_data.py turns into
unified records. The tiny base model's pretraining (toy/pretrain_base.py) draws its examples from here.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import common
import judging

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
# (noise sd in pixel values, blur radius in px) of the world's defects
DEFECT_STRENGTH = (60, 3.5)
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


def _apply_defect(frames: np.ndarray, defect: str | None, rng, strength=DEFECT_STRENGTH) -> np.ndarray:
    """frames: (T, H, W, 3) uint8. The world's defects are strong enough to see in an 8x8 patch, and in
    clips, which the model reads at half the size (32 px: the resize averages noise away and shrinks
    blur); with milder ones (45, 2.5) judges told clean from defective clips far less often.
    strength: (noise sd, blur radius); the base's pretraining starts on milder defects."""
    sd, radius = strength
    if defect == "noise":
        noisy = frames.astype(np.float32) + rng.normal(0, sd, frames.shape)
        return noisy.clip(0, 255).astype(np.uint8)
    if defect == "blur":
        return np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(radius))) for f in frames])
    return frames


def render_image(scene: dict, defect: str | None, rng, strength=DEFECT_STRENGTH) -> np.ndarray:
    """(64, 64, 3) uint8: the square by its edge, centred along it and jittered so no two renderings are
    identical. Positions are one word ("at the top", "on the left"): with quadrants ("top left") the
    base's position checks stayed at 42-62% where one-word positions reached 80%+. The square
    takes the backdrop's uneven light (up to +30 red to the right, +30 blue to the bottom): with it the
    judge's held-out figures rose on all eight."""
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


def render_video(scene: dict, defect: str | None, rng, strength=DEFECT_STRENGTH) -> np.ndarray:
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


def render(medium: str, scene: dict, defect: str | None, rng, strength=DEFECT_STRENGTH) -> np.ndarray:
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
            r["question"] = judging.render_question(r["task"], r["kind"], r["prompt"], new, r["scale"])
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
# <data dir>/
#   reward_train.jsonl, reward_test.jsonl   unified judge records, all four tasks x pairwise/pointwise
#   prompts_train.jsonl, prompts_test.jsonl  understanding questions for the policy, with the true answer
#   gen_candidates.jsonl                     generation prompts with 10 candidates each (stage 03 input)
#   media/                                   png pictures and mp4 clips

TASK_CODE = {"image_generation": "ig", "image_understanding": "iu", "video_generation": "vg",
             "video_understanding": "vu"}


# The toy's judge records are published in the released LLaVA conversation layout (../shared/FORMATS.md),
# one source folder per task and kind, as the authors' data is: <data dir>/sources/toy-ig/pairwise/
# train_data.json and test_data.json. 01 maps them to unified records with the reader it uses for the
# released data. Media paths are relative to the data folder, two levels above the source's own.
# source folder -> (task, kind, score scale, media folder inside the source), as 01's SOURCES
SOURCES = {f"toy-{code}/{kind}": (task, kind, None if kind == "pairwise" else
                                  (GEN_SCALE if task.endswith("generation") else UND_SCALE), "../..")
           for task, code in TASK_CODE.items() for kind in common.KINDS}


def as_released(record: dict) -> dict:
    """A toy judge record in the released layout: the media, and the human / gpt turns of the judge."""
    video = record["task"].startswith("video")
    tag = "<video>" if video else "<image>"
    return {"id": record["id"].split("-", 2)[2], "videos" if video else "images": record["media"],
            "conversations": [{"from": "human", "value": f"{tag}\n" * len(record["media"]) + record["question"]},
                              {"from": "gpt", "value": record["answer"]}]}


def write_sources(records: dict[str, list[dict]], folder: Path) -> None:
    """Publish {split: judge records} under `folder` in the released layout, one source per task and kind."""
    for source, (task, kind, _, _) in SOURCES.items():
        for split, rows in records.items():
            path = folder / source / f"{split}_data.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([as_released(r) for r in rows if (r["task"], r["kind"]) == (task, kind)]))


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
            "question": judging.render_question(task, kind, fields["prompt"], fields["responses"], fields["scale"]),
            "answer": judging.render_answer(task, kind, fields["label"], fields["score"])}


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
    the toy adds "truth", the ground-truth score of each candidate, and "scene", what the caption asks
    for (toy/reader.py checks a generator's own samples against it), for measuring pair precision."""
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
            rows.append({"id": rid, "task": task, "prompt": caption(medium, scene), "media": media, "truth": truth,
                         "scene": scene})
    return rows


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



def draw(seed: int, sizes: dict, writer, malformed: float) -> tuple[dict[str, list[dict]], int]:
    """Draw the whole toy world, its media through `writer`: ({file name: rows}, number of training
    answers rewritten in the wrong form). sizes: train_per_group, test_per_group, policy_train,
    policy_test, gen_prompts, gen_candidates. One random stream per split, so changing one split's
    size leaves the others unchanged."""
    stream = lambda name: np.random.default_rng([seed, sum(map(ord, name))])
    train, train_truth = write_reward_split("train", sizes["train_per_group"], stream("reward-train"), writer)
    test, _ = write_reward_split("test", sizes["test_per_group"], stream("reward-test"), writer)
    prompts_train = write_policy_prompts("train", sizes["policy_train"], stream("prompts-train"), writer)
    prompts_test = write_policy_prompts("test", sizes["policy_test"], stream("prompts-test"), writer)
    gen = write_gen_candidates(sizes["gen_prompts"], sizes["gen_candidates"], stream("gen"), writer)
    n_bad = malform_answers(train, train_truth, malformed, stream("malformed"))
    return {"reward_train": train, "reward_test": test, "prompts_train": prompts_train,
            "prompts_test": prompts_test, "gen_candidates": gen}, n_bad


class DryWriter(MediaWriter):
    """A MediaWriter that keeps the split bookkeeping (so the same examples are drawn) but writes no
    files: for drawing the world's texts alone, as toy/pretrain_base.py does for its tokenizer."""

    def __init__(self):
        self.owner, self.pending = {}, []

    def __exit__(self, *exc):
        return None

    def write(self, pixels, rel: str) -> str:
        return rel

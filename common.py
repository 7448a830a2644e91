"""Shared pieces of the UnifiedReward pipeline: only what two or more stages use.

Sections, in the order a reader meets them in the stages:
  config + run helpers        a @dataclass Config from the command line, seeds, device, autocast, the
                              checks that stop a stage before any work (missing input, unwritable output)
  files                       jsonl I/O, the skip log, atomic checkpoint writes
  media                       images (PIL) and videos (decord, 8 uniformly spaced frames)
  prompts and answers         the judge's question templates, answer strings, strict parsing
  models                      loading any Qwen2.5-VL checkpoint (the tiny toy one is built in toy/)
  batches                     chat template -> token ids, answer mask, padding
  log-probabilities           answer log-probs
  judging without generating  the one-forward readout of verdicts and scores (DESIGN.md section 6)
  judging records             checking a unified record, benchmark accuracies, judging by generating
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TASKS = ("image_generation", "image_understanding", "video_generation", "video_understanding")
KINDS = ("pairwise", "pointwise")
ROOT = Path(__file__).resolve().parent   # the repository: default paths (runs/toy/..., toy/base) are relative to it
END_OF_TURN = "<|im_end|>"  # Qwen's chat format closes every turn with this token; the judge learns to emit it


# ---------------------------------------------------------------------------------------------
# config + run helpers

def _field_comments(cls) -> dict[str, str]:
    """Map each dataclass field to the comment written after it, so `--help` shows the comments."""
    comments, last = {}, None
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines():
        m = re.match(r"\s*(\w+)\s*:[^=]*=.*?#\s*(.*)$", line)
        more = re.match(r"\s*#\s*(.*)$", line)
        if m:
            last = m.group(1)
            comments[last] = m.group(2)
        elif more and last:                      # a comment continued on the next lines
            comments[last] += " " + more.group(1)
        else:
            last = None
    return {k: v.replace("%", "%%") for k, v in comments.items()}   # argparse formats help with %


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the stage docstring's line breaks and shows each flag's default."""


def parse_config(cls, argv=None, description=None):
    """Build an argparse parser from a @dataclass Config: one `--flag` per field, comment as help.

    Booleans become `--flag / --no-flag`. Returns an instance of `cls`.
    """
    helps = _field_comments(cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=helps.get(f.name, ""))
        else:
            parser.add_argument(flag, dest=f.name, type=kind if default is not None else str,
                                default=default, help=helps.get(f.name, ""))
    return cls(**vars(parser.parse_args(argv)))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str):
    """bf16 autocast on CUDA; a no-op on CPU, where bf16 matmuls are slow and fp32 keeps runs exact."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def from_repository(cfg) -> None:
    """Stop before any work when a stage runs outside the repository with a default path: the defaults
    (runs/toy/..., toy/base) are relative to the repository, and elsewhere they would read nothing and
    leave stray folders behind."""
    if Path.cwd() == ROOT:
        return
    relative = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cfg)
                if isinstance(f.default, str) and f.default and getattr(cfg, f.name) == f.default
                and not Path(f.default).is_absolute() and f.default.startswith(("runs/", "toy/"))]
    if relative:
        raise SystemExit(f"the default paths are relative to the repository ({ROOT}), not to {Path.cwd()}: "
                         f"run the stages from there, or pass {', '.join(relative)}")


def require(path, flag: str, made_by: str, hub_ok: bool = True) -> None:
    """Stop before any work when an input is missing, naming the stage that writes it and the flag that
    replaces it ("runs/toy/reward not found: run 02_train_reward.py first, or pass --reward"). With
    hub_ok, a name shaped like a hub id ("owner/name", outside runs/ and toy/) is left to the hub client."""
    text = str(path)
    if Path(text).exists():
        return
    if hub_ok and re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith(("runs/", "toy/", ".")):
        return
    raise SystemExit(f"{text} not found: run {made_by} first, or pass {flag}")


def output_dir(path) -> Path:
    """Create the output folder, or stop before any work when it cannot be written: checkpoints are
    written beside it and renamed into place, so its parent must take new folders too."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f"{out.name}.probe{os.getpid()}")   # one per process: torchrun starts several
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as e:
        raise SystemExit(f"cannot write the output folder {out}: {e}") from None
    return out


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def nonfinite(what: str, step: int, out, saved: int | None) -> RuntimeError:
    """The error a training loop raises on a NaN or inf, before it reaches the weights: it says which
    checkpoint, if any, is left."""
    left = (f"the checkpoint of step {saved} in {out} is intact" if saved is not None
            else f"no checkpoint has been written to {out}")
    return RuntimeError(f"{what} at step {step}: stopped before the weights changed; {left} "
                        "(lower --lr or check the data)")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it (the schedule both training stages use)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# several processes (torchrun)
#
# `python 02_train_reward.py` is rank 0 of 1 and none of this does anything. Under
# `torchrun --nproc_per_node N 02_train_reward.py ...` every process runs the same script: each draws
# the same global batches and computes the loss of its own share of each, the gradients are averaged
# across ranks by DDP or FSDP2, and rank 0 writes the checkpoints and the reports.

def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun, join the process group: NCCL with one GPU per rank, or gloo
    on CPU (what the tests run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))   # "cuda" then means this rank's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # Leave the group before the interpreter tears down: a group still alive at exit can abort the
        # process ("terminate called without an active exception") after its work is done and saved.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), dist.get_world_size()


def all_sum(values: list[float]) -> list[float]:
    """Sums over ranks (the values themselves in a single process)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_map(fn, items: list, rank: int, world: int) -> list:
    """[fn(x) for x in items], the items split across ranks and the results (CPU objects) gathered on
    every rank. Every rank makes the same number of calls, the last item standing in where a rank runs
    out, because each forward of an FSDP2 model is a collective that all ranks must join."""
    if world == 1:
        return [fn(x) for x in items]
    import torch.distributed as dist
    per = -(-len(items) // world)
    mine = [(i, fn(items[i])) for i in (min(rank * per + k, len(items) - 1) for k in range(per))]
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    got = {i: r for part in parts for i, r in part}
    return [got[i] for i in range(len(items))]


PARALLEL = ("ddp", "fsdp", "zero2")


def wrap(objective: torch.nn.Module, layers, parallel: str, frozen=()) -> torch.nn.Module:
    """Make a module whose forward computes the loss data-parallel. The loss must be computed inside
    this forward: DDP and FSDP act through their forward's hooks, and a call that goes around them (to
    `model.model` directly, say) would leave the gradients unsynchronised without any error.

    ddp:   DistributedDataParallel: every rank holds a full copy; gradients are all-reduced.
    fsdp:  FSDP2 (`fully_shard`) on each of `layers` (the decoder layers), then on the whole: weights,
           gradients and optimizer state are sharded across ranks, a layer's weights gathered just for its
           forward and again for its backward (ZeRO-3). On CUDA the gathered weights are bf16 and gradients
           are reduced in fp32 (MixedPrecisionPolicy).
    zero2: the same, but weights stay gathered from forward to backward (reshard_after_forward=False):
           one gather a step instead of two, for the memory of full weights (ZeRO-2, the authors' setting).
    Only decoder layers get a shard group of their own: every rank runs each of them once per forward,
    as FSDP2's collectives require, while the vision tower runs once per kind of medium in the batch
    (pictures, clips), which differs between ranks; its weights belong to the whole model's group, or,
    when `frozen` (02's frozen tower), stay out of it, a full copy on every rank."""
    if parallel not in PARALLEL:
        raise SystemExit(f"--parallel {parallel}: choose one of {', '.join(PARALLEL)}")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(objective, broadcast_buffers=False)   # its buffers are constants
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=parallel == "fsdp")
    fully_shard(objective, mp_policy=mp, reshard_after_forward=parallel == "fsdp", ignored_params=set(frozen))
    return objective


def full_state_dict(model) -> dict:
    """The model's whole state dict on CPU, gathered from the shards when FSDP2 split it (a collective:
    every rank calls it); the plain state dict otherwise."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not any(hasattr(p, "to_local") for p in model.parameters()):   # not sharded (DTensor parameters)
        return model.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict = {}   # tied weights (embeddings and lm_head) gathered as two copies: one tensor again
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        if key in state:   # rank 0 receives the whole dict, the others an empty one
            state[name] = state[key]
    return state


# ---------------------------------------------------------------------------------------------
# files

def write_jsonl(path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def append_jsonl(path, row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class SkipLog:
    """Bad input is skipped and counted, never silently lost: one line per skip in `skipped.jsonl`
    naming the file, the record and the reason, and a one-line summary for the console. The same skip
    is logged once however often it is met (02 evaluates the same records many times). With `resume`
    the earlier skips are kept and new ones appended."""

    def __init__(self, path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, int] = {}
        self.seen: set[tuple] = set()
        if resume and self.path.exists():   # the earlier run's skips stay, and are not logged twice
            for row in read_jsonl(self.path):
                self.seen.add((str(row["file"]), str(row["id"]), row["reason"]))
                key = row["reason"].split(":")[0]
                self.counts[key] = self.counts.get(key, 0) + 1
        else:
            self.path.write_text("")

    def add(self, file, record_id, reason: str) -> None:
        if (str(file), str(record_id), reason) in self.seen:
            return
        self.seen.add((str(file), str(record_id), reason))
        key = reason.split(":")[0]
        self.counts[key] = self.counts.get(key, 0) + 1
        append_jsonl(self.path, {"file": str(file), "id": record_id, "reason": reason})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 records"
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"skipped {self.total} records ({parts}); see {self.path}"


def read_jsonl(path, skips: SkipLog | None = None) -> list[dict]:
    """Read a jsonl file. A malformed line (bad JSON, not an object, bytes that are not UTF-8) is skipped
    and logged when `skips` is given, else raises; the other lines are kept."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except UnicodeDecodeError as e:
                reason = f"not UTF-8: {e.reason} at byte {e.start}"
            except ValueError as e:
                reason = f"malformed json: {e}"
            else:
                rows.append(row)
                continue
            if skips is None:
                raise ValueError(f"{path}:{lineno}: {reason}") from None
            skips.add(path, f"line {lineno}", reason)
    return rows


def save_checkpoint(model, processor, out_dir, extra: dict | None = None, state_dict: dict | None = None) -> None:
    """Write a `save_pretrained` folder atomically: into a temp folder, then rename over the old one,
    so an interrupted run never leaves a half-written checkpoint. `extra` goes to train_state.pt;
    `state_dict` (gathered from shards by full_state_dict) replaces the model's own."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    if extra is not None:
        torch.save(extra, tmp / "train_state.pt")
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        for f in out_dir.iterdir():   # logs and reports kept beside the weights travel along
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# media

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
NUM_FRAMES = 8  # UnifiedReward feeds every video as 8 uniformly spaced frames


class MediaError(Exception):
    """A medium that cannot be read; callers skip the record and name it."""


@dataclasses.dataclass
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float          # frames per second of the *sampled* frames (sets the temporal rope spacing)


def load_image(path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types; all mean "cannot use this file"
        raise MediaError(f"cannot read image {path}: {e}") from None


def load_video(path, num_frames: int = NUM_FRAMES) -> Video:
    """Decode `num_frames` uniformly spaced frames with decord. A list of image paths is a video
    given as pre-extracted frames (as in the released video data)."""
    if isinstance(path, (list, tuple)):
        idx = np.linspace(0, len(path) - 1, num_frames).round().astype(int)
        frames = np.stack([np.asarray(load_image(path[i])) for i in idx])
        return Video(frames, fps=1.0)
    import decord  # imported here: only stages that read videos need it
    try:
        vr = decord.VideoReader(str(path), num_threads=1)
        n = len(vr)
        if n == 0:
            raise MediaError(f"video {path} has no frames")
        idx = np.linspace(0, n - 1, num_frames).round().astype(int)
        frames = vr.get_batch(idx).asnumpy()
        duration = n / max(vr.get_avg_fps(), 1e-6)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot read video {path}: {e}") from None
    return Video(frames, fps=num_frames / duration)


def is_video(entry) -> bool:
    return isinstance(entry, (list, tuple)) or str(entry).lower().endswith(VIDEO_EXTS)


def load_media(entries, base_dir) -> list:
    """Media entries of a record (paths relative to `base_dir`) -> PIL images and Videos."""
    base = Path(base_dir)
    out = []
    for e in entries:
        if isinstance(e, (list, tuple)):
            out.append(load_video([base / p for p in e]))
        elif is_video(e):
            out.append(load_video(base / e))
        else:
            out.append(load_image(base / e))
    return out


# ---------------------------------------------------------------------------------------------
# prompts and answers
#
# The judge sees the media first (each labelled "Picture k:" / "Video k:" by the chat template), then
# one of these questions. Two template sets share the same answer strings (DESIGN.md section 7):
#   short  terse wording, for the tiny toy model (short prompts are learned much faster);
#   paper  the released UnifiedReward wording, for real checkpoints.

TEMPLATES = {
    "short": {
        ("image_generation", "pairwise"): "Caption: {prompt}\nWhich image fits the caption better?",
        ("image_generation", "pointwise"): "Caption: {prompt}\nRate the image from {lo} to {hi}.",
        ("video_generation", "pairwise"): "Caption: {prompt}\nWhich video fits the caption better?",
        ("video_generation", "pointwise"): "Caption: {prompt}\nRate the video from {lo} to {hi}.",
        ("image_understanding", "pairwise"):
            "Question: {prompt}\nAnswer 1: {response1}\nAnswer 2: {response2}\nWhich answer is better?",
        ("image_understanding", "pointwise"):
            "Question: {prompt}\nAnswer: {response1}\nRate the answer from {lo} to {hi}.",
        ("video_understanding", "pairwise"):
            "Question: {prompt}\nAnswer 1: {response1}\nAnswer 2: {response2}\nWhich answer is better?",
        ("video_understanding", "pointwise"):
            "Question: {prompt}\nAnswer: {response1}\nRate the answer from {lo} to {hi}.",
    },
    # The released wording (CodeGoat24/UnifiedReward: inference_llava/* for generation pairs, whose
    # conclusions are our answer strings; inference_qwen/* otherwise), with the scale made a parameter.
    "paper": {
        ("image_generation", "pairwise"):
            "You are given a text caption and two generated images based on that caption. Your task is to evaluate "
            "and compare these images based on two key criteria:\n1. Alignment with the Caption: Assess how well each "
            "image aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, "
            "and attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of each "
            "image, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nCompare "
            "both images using the above criteria and select the one that better aligns with the caption while "
            "exhibiting superior visual quality.\nProvide a clear conclusion such as \"Image 1 is better than Image "
            "2.\", \"Image 2 is better than Image 1.\" and \"Both images are equally good.\"\nYour task is provided "
            "as follows:\nText Caption: [{prompt}]",
        ("image_generation", "pointwise"):
            "You are given a text caption and a generated image based on that caption. Your task is to evaluate this "
            "image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with "
            "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
            "described in the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including "
            "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nBased on the above "
            "criteria, assign a score from {lo} to {hi} after 'Final Score:'.\nYour task is provided as follows:\n"
            "Text Caption: [{prompt}]",
        ("image_understanding", "pairwise"):
            "You are given an image and a question related to it. Your job is to evaluate the two responses based on "
            "these five factors:\n\n1. Accuracy of Object Descriptions: Review how accurately the objects are "
            "described in the responses, ensuring they match those in the ground truth. Be mindful of irrelevant or "
            "incorrect objects being mentioned.\n\n2. Relationship Between Objects: Check if the response properly "
            "describes how the objects relate to each other, reflecting their actual positions or interactions, as "
            "seen in the image.\n\n3. Description of Attributes: Assess how well the response captures the attributes "
            "(e.g., size, color, shape) of the objects in the image, in line with the ground truth.\n\n4. Helpfulness: "
            "Consider whether the response offers useful information that enhances the understanding of the image. "
            "Does it add context or provide extra insights? Also, evaluate whether it follows the instructions given "
            "in the prompt.\n\n5. Ethical Concerns: Review the response to ensure it avoids sensitive, harmful, or "
            "inappropriate content. The response should be fair, respect privacy, and be free of bias or offensive "
            "material.\n\nAfter evaluating both answers, determine which one is better based on these factors and "
            "clearly state your decision, such as 'Answer 1 is better' or 'Answer 2 is better.'\n\n"
            "Question: {prompt}\nAnswer 1: {response1}\nAnswer 2: {response2}\n",
        ("image_understanding", "pointwise"):
            "You are provided with an image and a question for this image. Please review the corresponding response "
            "based on the following 5 factors: 1. Accuracy in Object Description 2. Accuracy in Depicting "
            "Relationships 3. Accuracy in Describing Attributes 4. Helpfulness 5. Ethical Considerations. From {lo} to "
            "{hi}, how much do you rate for this response in terms of the correct and comprehensive description of "
            "the image?\nProvide a few lines for explanation and the rate number at last after \"Final Score:\".\n"
            "Your task is provided as follows:\nQuestion: [{prompt}]\nResponse: [{response1}]\n",
        ("video_generation", "pairwise"):
            "Suppose you are an expert in judging and evaluating the quality of AI-generated videos. You are given a "
            "text caption and the frames of two generated videos based on that caption. Your task is to evaluate and "
            "compare two videos based on two key criteria:\n1. Alignment with the Caption: Assess how well each video "
            "aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, and "
            "attributes as described in the caption.\n2. Overall Video Quality: Examine the visual quality of each "
            "video, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nCompare "
            "both videos using the above criteria and select the one that better aligns with the caption while "
            "exhibiting superior visual quality.\nProvide a clear conclusion such as \"Video 1 is better than Video "
            "2.\", \"Video 2 is better than Video 1.\" and \"Both videos are equally good.\"\nYour task is provided "
            "as follows:\nText Caption: [{prompt}]",
        ("video_generation", "pointwise"):
            "Suppose you are an expert in judging and evaluating the quality of AI-generated videos. You are given a "
            "text caption and the frames of a generated video based on that caption. Your task is to evaluate this "
            "videos based on two key criteria:\n1. Alignment with the Caption: Assess how well each video aligns with "
            "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
            "described in the caption.\n2. Overall Video Quality: Examine the visual quality of each video, including "
            "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nEvaluate this video using "
            "the above criteria and assign a score from {lo} to {hi} after 'Final Score:'\nYour task is provided as "
            "follows:\nText Caption: [{prompt}]",
        ("video_understanding", "pairwise"):
            "Please analyze the following video and question, then determine which of the two provided answers is "
            "better\nQuestion: {prompt}\nAnswer 1: {response1}\nAnswer 2: {response2}\nPlease evaluate both answers "
            "based on the following criteria:\n1. Accuracy: How well does the answer align with the visual "
            "information in the video?\n2. Completeness: Does the answer fully address all aspects of the question?\n"
            "3. Clarity: Is the answer easy to understand and well-articulated?\n4. Relevance: Does the answer "
            "directly relate to the question and the video?\nAfter your evaluation, please:\n1. Explain your "
            "reasoning for each criterion.\n2. Provide an overall judgment on which answer is better (Answer 1 or "
            "Answer 2). For example: \"Overall Judgment: Answer 1 is better than Answer 2.\"\nYour response should "
            "be structured and detailed, demonstrating your understanding of both the visual and textual elements of "
            "the task. You have to choose the better of the two answers and can't say that both answers are equally "
            "good.",
        ("video_understanding", "pointwise"):
            "You are provided with a video and a question for this video. Please review the corresponding response "
            "based on the following 5 factors: 1. Accuracy in Object Description 2. Accuracy in Depicting "
            "Relationships 3. Accuracy in Describing Attributes 4. Helpfulness 5. Ethical Considerations.\nYou need "
            "to assign a score from {lo} to {hi} based on the above 5 factors for the response after 'Final Score:'."
            "\nYour task is provided as follows:\nQuestion: [{prompt}]\nResponse: [{response1}]",
    },
}


def medium_noun(task: str) -> str:
    return "Video" if task.startswith("video") else "Image"


def render_question(task, kind, prompt, responses=(), scale=None, template="short") -> str:
    """The text part of the judge's user turn (the media are added by `build_messages`)."""
    lo, hi = scale if scale else (None, None)
    r = list(responses) + ["", ""]
    return TEMPLATES[template][(task, kind)].format(prompt=prompt, response1=r[0], response2=r[1], lo=lo, hi=hi)


def render_answer(task, kind, label=None, score=None) -> str:
    """The judge's target answer. Pairwise label: 1 or 2 = the better one, 0 = tie."""
    if kind == "pointwise":
        return f"Final Score: {score:g}" if isinstance(score, float) else f"Final Score: {score}"
    if task.endswith("understanding"):
        return f"Answer {label} is better."
    noun = medium_noun(task)
    if label == 0:
        return f"Both {noun.lower()}s are equally good."
    return f"{noun} {label} is better than {noun} {3 - label}."


def verdict_candidates(task, kind, scale=None) -> list[tuple[int, str]]:
    """Every answer the judge may give for this task/kind, as (value, answer string)."""
    if kind == "pointwise":
        lo, hi = scale
        return [(s, render_answer(task, kind, score=s)) for s in range(int(lo), int(hi) + 1)]
    labels = (1, 2) if task.endswith("understanding") else (1, 2, 0)
    return [(lab, render_answer(task, kind, label=lab)) for lab in labels]


def parse_verdict(text: str, task: str, kind: str, scale=None):
    """Strictly read a judge's free-text output (reasoning allowed before the verdict).

    Returns the label (1, 2, 0 = tie) or the score as a number, or None when the output states no
    verdict, states conflicting ones, or gives a score outside the scale. None is counted by the
    caller, never read as "1" (a bug in the released scripts, which default to Image 1).
    """
    if kind == "pointwise":
        found = re.findall(r"Final Score:\s*\**\s*(-?\d+(?:\.\d+)?)", text)
        if not found:
            return None
        score = float(found[-1])
        score = int(score) if score.is_integer() else score
        if scale and not (scale[0] <= score <= scale[1]):
            return None
        return score
    # the verdict phrases, short enough to match every released wording ("Image 1 is better.",
    # "Image 1 is better than Image 2.", "Overall Judgment: Answer 1 is better than Answer 2.")
    noun = "Answer" if task.endswith("understanding") else medium_noun(task)
    phrases = {1: f"{noun} 1 is better", 2: f"{noun} 2 is better"}
    if not task.endswith("understanding"):
        phrases[0] = f"Both {noun.lower()}s are equally good"
    hits = {value for value, phrase in phrases.items() if phrase in text}
    return hits.pop() if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------
# models

def load_model(name_or_path, device="cpu", train=False, precision="fp32"):
    """Any Qwen2.5-VL checkpoint (hub id or local folder) through the same calls a hub user makes.

    Weights are fp32 on CPU. On CUDA they are bf16 for judging and sampling. For training they are fp32
    (`precision="fp32"`), with the math in bf16 under `autocast`: AdamW's steps at fine-tuning learning
    rates (1e-5 and below) are smaller than bf16's rounding step for a weight near 0.02 (about 1e-4), so
    bf16 weights updated by rounding to nearest would barely move. `precision="bf16"` keeps bf16 weights
    anyway (on CPU too) for AdamW16, whose stochastic rounding moves them by the right amount on average
    (see AdamW16). Checkpoints are saved in the weights' dtype."""
    from transformers import AutoModelForImageTextToText
    bf16 = precision == "bf16" or (device == "cuda" and not train)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    return model.to(device)


def prepare_for_training(model, grad_checkpointing: bool = False, compile_layers: bool = False):
    """Train mode with every dropout at zero, optionally activation checkpointing and compiled decoder layers.

    Dropout is zeroed rather than the model left in eval mode: transformers turns gradient checkpointing
    on only in train mode, and DPO needs the policy's log-probs computed exactly as the reference's were.
    Checkpointing keeps only each decoder layer's input and recomputes the rest in the backward pass:
    activations shrink from all layers' to one layer's, for about a third more compute. torch.compile of
    each decoder layer (one compiled code shared by all of them) fuses the norms', rotary embedding's and
    MLP's elementwise kernels; the weights' names stay the same, so checkpoints do not change."""
    for module in model.modules():   # attention layers read their own attention_dropout at every forward
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    model.config.use_cache = False
    if grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        for layer in model.model.language_model.layers:
            layer.compile()
    return model.train()


# Bytes of GPU memory per trained parameter, weights + gradient + AdamW's two moments. A 7B judge's
# language model has 7.6B parameters: fp32 needs 122 GB before any activation, bf16 61 GB, which fits
# one 80 GB GPU with activation checkpointing (tools/gpu_bench.py measures both).
BYTES_PER_PARAM = {"fp32": 4 + 4 + 8, "bf16": 2 + 2 + 4}


def make_optimizer(params, precision: str, lr: float, weight_decay: float):
    """torch's AdamW for fp32 weights (foreach: one call over all tensors, CUDA's default, not CPU's);
    AdamW16 for bf16 weights."""
    params = list(params)
    if precision not in BYTES_PER_PARAM:
        raise SystemExit(f"--precision {precision}: choose one of {', '.join(BYTES_PER_PARAM)}")
    if precision == "bf16":
        return AdamW16(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def stochastic_round(x: torch.Tensor, generator=None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with the probability that makes the result exact on
    average: E[stochastic_round(x)] = x. bf16 is fp32 with the low 16 bits of the mantissa dropped, so add
    a uniform random integer below 2**16 to the bit pattern, then drop those bits (sign-magnitude: this
    rounds the magnitude, which is right for either sign)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)   # exact: low bits are zero


class AdamW16(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) for bf16 weights with bf16 moments: 8 bytes per parameter
    instead of fp32's 16 (BYTES_PER_PARAM), in plain PyTorch.

    The update is computed in fp32, then weights and moments are written back by stochastic rounding
    (Zamirai et al. 2020, "Revisiting BFloat16 Training"): a step smaller than half of bf16's spacing
    would always round back to the old weight, but rounded at random it lands on the next value with
    probability step / spacing, so the weight follows the fp32 trajectory in expectation. The second
    moment needs it too: with beta2 = 0.999 it changes by 0.1% a step, under bf16's 0.4% spacing.
    Parameters are updated in buckets of up to 2**26 elements, concatenated into flat fp32 buffers: a
    few dozen kernels per bucket instead of per tensor (a 3B model has 434 tensors), and fp32
    temporaries of a bucket's size only (about 2 GB). Its state holds the step count and the two moments per
    parameter, like torch's AdamW; the rounding noise of step t of bucket i is seeded by (seed, t, i),
    so a resumed run rounds as an uninterrupted one.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0, bucket=1 << 26):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed, self.bucket = seed, bucket
        self.generators: dict = {}   # one per device

    def _buckets(self, params):
        """Lists of (parameter, start, end) flat slices of one device, up to self.bucket elements in all:
        a tensor larger than a bucket (a 7B model's 545M-entry embedding) is cut into slices."""
        out, size = [], 0
        for p in params:
            n = (p.to_local() if hasattr(p, "to_local") else p).numel()
            for a in range(0, n, self.bucket):
                b = min(n, a + self.bucket)
                if out and (size + b - a > self.bucket or p.device != out[-1][0].device):
                    yield out
                    out, size = [], 0
                out.append((p, a, b))
                size += b - a
        if out:
            yield out

    @torch.no_grad()
    def step(self):
        i = 0
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=torch.bfloat16),
                                         exp_avg_sq=torch.zeros_like(p, dtype=torch.bfloat16))
                self.state[p]["step"] += 1
            for pieces in self._buckets(params):
                t = self.state[pieces[0][0]]["step"].item()
                gen = self.generators.setdefault(pieces[0][0].device, torch.Generator(pieces[0][0].device))
                gen.manual_seed(self.seed * 1_000_003 ** 2 + int(t) * 1_000_003 + i)
                i += 1
                local = lambda x: x.to_local() if hasattr(x, "to_local") else x    # FSDP2: this rank's shard
                views = lambda get: [local(get(p)).view(-1)[a:b] for p, a, b in pieces]   # slices of one tensor
                ws, ms, vs = views(lambda p: p), views(lambda p: self.state[p]["exp_avg"]), \
                    views(lambda p: self.state[p]["exp_avg_sq"])
                flat = lambda xs: torch.cat(xs).float()                                 # (n,) fp32 copies
                w, g = flat(ws), flat(views(lambda p: p.grad))
                m = flat(ms).lerp_(g, 1 - b1)                                           # b1 m + (1 - b1) g
                v = flat(vs).mul_(b2).addcmul_(g, g, value=1 - b2)                      # b2 v + (1 - b2) g^2
                w.mul_(1 - lr * wd)                                                     # decoupled decay
                w.addcdiv_(m, (v / (1 - b2 ** t)).sqrt_().add_(eps), value=-lr / (1 - b1 ** t))
                sizes = [b - a for _, a, b in pieces]
                for new, olds in ((w, ws), (m, ms), (v, vs)):
                    for old, part in zip(olds, stochastic_round(new, gen).split(sizes)):
                        old.copy_(part)


def load_processor(name_or_path, max_pixels: int = 0, frame_pixels: int = 0):
    """The checkpoint's processor; max_pixels / frame_pixels > 0 cap the pixels of a picture / of a video
    frame (larger media are resized down, keeping their aspect ratio), or the checkpoint's own caps stay."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(name_or_path)
    if max_pixels:
        processor.image_processor.size.longest_edge = max_pixels
    if frame_pixels:
        processor.video_processor.size.longest_edge = frame_pixels
    return processor


# The limits a template implies unless a stage's flags say otherwise: (max_len, max_pixels, frame_pixels).
# The released wording goes with real checkpoints and the authors' settings: a 13,000-token cutoff,
# 262,144 pixels a picture (512 x 512) and 16,384 a video frame (128 x 128). 0 keeps the checkpoint's caps.
TEMPLATE_LIMITS = {"short": (2048, 0, 0), "paper": (13000, 262144, 16384)}


def template_limits(cfg) -> None:
    """Fill a Config's max_len, max_pixels and frame_pixels left at 0 with its template's limits."""
    for field, value in zip(("max_len", "max_pixels", "frame_pixels"), TEMPLATE_LIMITS[cfg.template]):
        if not getattr(cfg, field):
            setattr(cfg, field, value)


# ---------------------------------------------------------------------------------------------
# batches

class TooLong(ValueError):
    """Media tokens plus answer do not fit the length limit. Never truncated: the record is skipped."""


def build_messages(media, question: str) -> list[dict]:
    """One user turn: every medium first (images and videos in record order), then the question."""
    parts = [{"type": "video" if isinstance(m, Video) else "image"} for m in media]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def encode(processor, media, question: str, answer: str | None = None, max_len: int = 4096) -> dict:
    """One example -> tensors for the model.

    The prompt (chat template with the generation prompt) goes through the processor, which expands
    each <|image_pad|>/<|video_pad|> into one token per merged patch. The answer is tokenized on its
    own and appended with the end-of-turn token, so the answer span is known exactly.
    Returns input_ids (L,), mm_token_type_ids (L,) with 0 text / 1 image / 2 video, answer_mask (L,)
    True on answer tokens, and the vision tensors (pixel_values: (patches, C*T*P*P), *_grid_thw: (n, 3)).
    Raises TooLong instead of truncating.
    """
    return encode_many(processor, [(media, question, answer)], max_len)[0]


def encode_many(processor, examples, max_len: int = 4096) -> list[dict]:
    """`encode` for a non-empty list of (media, question, answer) examples through one processor call,
    with the same tensors. The processor's fixed cost per call is most of a toy example's: 16
    base-pretraining examples took 34 ms one by one and 14 ms together. Raises TooLong if any example
    does not fit (callers that skip one bad example retry one by one, as 02 does)."""
    prompts = [processor.apply_chat_template(build_messages(media, question), tokenize=False,
                                             add_generation_prompt=True, add_vision_id=True)
               for media, question, _ in examples]
    images = [m for media, _, _ in examples for m in media if not isinstance(m, Video)]
    videos = [m for media, _, _ in examples for m in media if isinstance(m, Video)]
    kwargs = {}
    if videos:
        kwargs["videos"] = [v.frames for v in videos]
        kwargs["video_metadata"] = [{"total_num_frames": len(v.frames), "fps": v.fps} for v in videos]
    enc = processor(text=prompts, images=images or None, return_tensors="pt", padding=True, **kwargs)
    # the processor concatenates every medium's patches; each medium has prod(grid) rows of them
    media_of = {}
    for name, pixels, grid, extra in (("image", "pixel_values", "image_grid_thw", ()),
                                      ("video", "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",))):
        if grid in enc:
            rows = torch.split(enc[pixels], enc[grid].prod(-1).tolist())
            media_of[name] = [{pixels: r, grid: enc[grid][i:i + 1], **{k: enc[k][i:i + 1] for k in extra}}
                              for i, r in enumerate(rows)]
    answers = [[] if a is None else processor.tokenizer(a + END_OF_TURN, add_special_tokens=False)["input_ids"]
               for _, _, a in examples]
    out, seen = [], {"image": 0, "video": 0}
    for j, (media, _, _) in enumerate(examples):
        keep = enc["attention_mask"][j].bool()               # drop the padding between prompts
        ids, mm = enc["input_ids"][j][keep], enc["mm_token_type_ids"][j][keep]
        answer_ids = torch.tensor(answers[j], dtype=torch.long)
        if len(ids) + len(answer_ids) > max_len:
            raise TooLong(f"too long: {len(ids)} prompt+media tokens + {len(answer_ids)} answer tokens > {max_len}")
        vision = {}
        for name in ("image", "video"):
            n = sum((name == "video") == isinstance(m, Video) for m in media)
            mine = media_of.get(name, [])[seen[name]:seen[name] + n]
            seen[name] += n
            for k in (mine[0] if mine else {}):
                vision[k] = torch.cat([m[k] for m in mine])
        out.append({"input_ids": torch.cat([ids, answer_ids]),
                    "mm_token_type_ids": torch.cat([mm, torch.zeros_like(answer_ids, dtype=mm.dtype)]),
                    "answer_mask": torch.cat([torch.zeros(len(ids), dtype=torch.bool),
                                              torch.ones(len(answer_ids), dtype=torch.bool)]),
                    **vision})
    return out


def collate(examples: list[dict], pad_id: int, side: str = "right") -> dict:
    """Pad encoded examples into a batch. Right padding for training and scoring, left padding for
    generation (new tokens must follow the prompt directly). Vision tensors are concatenated in
    example order, which is the order the model consumes them in."""
    L = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": [], "answer_mask": []}
    for e in examples:
        n = L - len(e["input_ids"])
        pad = lambda x, v: F.pad(x, (n, 0) if side == "left" else (0, n), value=v)
        batch["input_ids"].append(pad(e["input_ids"], pad_id))
        batch["attention_mask"].append(pad(torch.ones_like(e["input_ids"]), 0))
        batch["mm_token_type_ids"].append(pad(e["mm_token_type_ids"], 0))
        batch["answer_mask"].append(pad(e["answer_mask"], False))
    batch = {k: torch.stack(v) for k, v in batch.items()}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
              "image_embeds", "video_embeds"):
        parts = [e[k] for e in examples if k in e]
        if parts:
            batch[k] = torch.cat(parts)
    return batch


def to_device(batch: dict, device) -> dict:
    """Tensors to the device; from page-locked memory the copy does not wait (non_blocking)."""
    return {k: v.to(device, non_blocking=v.is_pinned()) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The batch minus our own bookkeeping (answer_mask), i.e. exactly what the model's forward takes.
    Visual tokens computed beforehand (image_embeds / video_embeds: (tokens, H), see 02's
    `frozen_tower_features`) go in as the vision tower's output, which the model then skips running."""
    inputs = {k: v for k, v in batch.items() if k not in ("answer_mask", "image_embeds", "video_embeds")}
    if "image_embeds" in batch or "video_embeds" in batch:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        inputs["mm_encoder_outputs"] = {m: BaseModelOutputWithPooling(pooler_output=(batch[f"{m}_embeds"],))
                                        for m in ("image", "video") if f"{m}_embeds" in batch}
    return inputs


@torch.no_grad()
def visual_tokens(model, encs: list[dict], device) -> None:
    """Replace each example's pixels by the vision tower's output, in place, running the tower once
    per distinct medium.

    pixel_values (patches, C*T*P*P) -> image_embeds (tokens, H), one row per <|image_pad|> token;
    likewise pixel_values_videos -> video_embeds. The tower sees each medium on its own (its attention
    never crosses media), so a medium shown by several sequences needs its tokens once: 03 judges each
    understanding prompt's picture in 20 sequences, and each generated candidate in three. In 02, whose
    tower is frozen, the cache then keeps tokens instead of pixels. The tokens equal the forward's own
    (tested), so results do not change."""
    for medium, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                 ("video", "pixel_values_videos", "video_grid_thw")):
        has = list({id(e): e for e in encs if pixels in e}.values())
        if not has:
            continue
        parts, index, unique = [], {}, []          # each example's media, as indices into `unique`
        for e in has:
            mine = []
            for rows, g in zip(torch.split(e[pixels], e[grid].prod(-1).tolist()), e[grid]):
                key = (tuple(g.tolist()), rows.numpy().tobytes())    # equal pixels, equal tokens
                if key not in index:
                    index[key] = len(unique)
                    unique.append((rows, g))
                mine.append(index[key])
            parts.append(mine)
        tower = model.model.get_image_features if medium == "image" else model.model.get_video_features
        with autocast(device):
            out = tower(torch.cat([r for r, _ in unique]).to(device),
                        torch.stack([g for _, g in unique]).to(device)).pooler_output  # (tokens, H) per medium
        for e, mine in zip(has, parts):
            e[f"{medium}_embeds"] = torch.cat([out[k] for k in mine]).cpu()
            del e[pixels]


# ---------------------------------------------------------------------------------------------
# log-probabilities

def hidden_states(model, batch) -> torch.Tensor:
    """Last hidden states (B, L, H) of the language model. The vocabulary projection is applied only
    where a log-prob is needed: a real Qwen vocabulary has 152k entries, and full (B, L, V) logits
    would dwarf everything else in memory."""
    return model.model(**model_inputs(batch)).last_hidden_state


def answer_token_logps(model, batch, other_ids=None):
    """Log-prob of every answer token under teacher forcing.

    Token t is predicted from the hidden state at t-1. Returns (logps (N,), rows (N,), other (N,) or
    None): N answer tokens in the whole batch, the batch row each belongs to, and, given other_ids
    (B, L) (another token for each position), the log-prob of that other token at the same places from
    the same distribution: 02's Bradley-Terry term compares the right verdict token with the wrong one.
    """
    target = batch["answer_mask"][:, 1:]                         # (B, L-1) which targets count
    h = hidden_states(model, batch)[:, :-1][target]              # (N, H)
    logp = model.lm_head(h).float().log_softmax(-1)              # (N, V)
    tokens = batch["input_ids"][:, 1:][target]                   # (N,)
    other = None if other_ids is None else logp.gather(1, other_ids[:, 1:][target][:, None])[:, 0]
    return logp.gather(1, tokens[:, None])[:, 0], target.nonzero()[:, 0], other


def sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N,) values with their row ids -> (n_rows,) sums."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def answer_logps(model, batch) -> torch.Tensor:
    """Sum of answer-token log-probs per example: (B,). The sequence log-likelihood DPO compares."""
    logps, rows, _ = answer_token_logps(model, batch)
    return sum_per_row(logps, rows, batch["input_ids"].shape[0])


# ---------------------------------------------------------------------------------------------
# judging without generating (DESIGN.md section 6)
#
# The judge's possible answers ("Image 1 is better than Image 2.", "Both images are equally good.",
# "Final Score: 4", ...) differ only at a few decisive tokens. Teacher-force the one token path that
# passes through every point where they diverge, read the next-token log-probs there, and each
# answer's probability is the product along its branch: one forward pass instead of `generate`
# followed by string parsing, and a probability instead of a hard verdict.

def decision_path(tokenizer, answers: list[str]):
    """Where the candidate answers diverge, as token ids.

    Returns (path, steps): `path` is the token sequence to teacher-force after the prompt; `steps` is
    a list of (depth, {candidate index: token id at that depth}) for every divergence point. Raises
    ValueError when the answers branch along more than one path (e.g. a 0-100 scale), which cannot be
    read from one forward pass.
    """
    seqs = [tokenizer(a + END_OF_TURN, add_special_tokens=False)["input_ids"] for a in answers]
    path, steps, group, depth = [], [], list(range(len(seqs))), 0
    while len(group) > 1:
        nexts: dict[int, list[int]] = {}
        for i in group:
            nexts.setdefault(seqs[i][depth], []).append(i)
        if len(nexts) > 1:
            steps.append((depth, {i: tok for tok, members in nexts.items() for i in members}))
            crowded = [members for members in nexts.values() if len(members) > 1]
            if len(crowded) > 1:
                raise ValueError(f"answers {answers[:3]}... branch along several paths; "
                                 "judge them with generate + parsing instead")
            if not crowded:
                break
            group = crowded[0]
        path.append(seqs[group[0]][depth])
        depth += 1
    return path, steps


@torch.no_grad()
def answer_probs(model, processor, prompts, answers: list[str], device, batch_size=16, max_len=4096) -> torch.Tensor:
    """P(answer k | prompt i) over a fixed set of candidate answers: (N, K), rows sum to 1.

    prompts: list of (media, question). One forward pass per batch of prompts. A prompt that does not
    fit max_len together with the verdict gets a row of NaN (callers skip and count it), never a
    truncated one.
    """
    path, steps = decision_path(processor.tokenizer, answers)
    path = torch.tensor(path, dtype=torch.long)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [(media, question, None) for media, question in prompts[i:i + batch_size]]
        try:
            encs, fits = encode_many(processor, chunk, max_len - len(path)), [True] * len(chunk)
        except TooLong:                              # one at a time, to find which
            encs, fits = [], []
            for example in chunk:
                try:
                    encs.append(encode(processor, *example, max_len=max_len - len(path)))
                    fits.append(True)
                except TooLong:
                    fits.append(False)
        rows_out = torch.full((len(chunk), len(answers)), float("nan"))
        if not encs:
            out.append(rows_out)
            continue
        visual_tokens(model, encs, device)          # a medium shown by several prompts: its tokens once
        for e in encs:
            e["prompt_len"] = len(e["input_ids"])
            e["input_ids"] = torch.cat([e["input_ids"], path])
            e["mm_token_type_ids"] = F.pad(e["mm_token_type_ids"], (0, len(path)))
            e["answer_mask"] = F.pad(e["answer_mask"], (0, len(path)))
        batch = to_device(collate(encs, processor.tokenizer.pad_token_id), device)
        with autocast(device):
            h = hidden_states(model, batch)                                     # (B, L, H)
        rows = torch.arange(len(encs), device=device)
        scores = torch.zeros(len(encs), len(answers), device=device)
        for depth, tokens in steps:
            # the token at prompt position prompt_len + depth is predicted from the state just before it
            pos = torch.tensor([e["prompt_len"] + depth - 1 for e in encs], device=device)
            logp = model.lm_head(h[rows, pos]).float().log_softmax(-1)          # (B, V)
            for k, tok in tokens.items():
                scores[:, k] += logp[:, tok]
        rows_out[torch.tensor(fits)] = scores.softmax(-1).cpu()
        out.append(rows_out)
    return torch.cat(out)


def swapped(record: dict, media: list) -> tuple[dict, list]:
    """The same pair in the other order: media swapped for generation, answers for understanding."""
    if record["task"].endswith("generation"):
        return record, media[::-1]
    return {**record, "responses": record["responses"][::-1]}, media


@torch.no_grad()
def judge_pairwise(model, processor, records, media, device, template="short", both_orders=True,
                   batch_size=16, max_len=4096) -> torch.Tensor:
    """P(first better), P(second better), P(tie) for each pairwise record: (N, 3).

    Judged in both orders and averaged, which cancels the judge's position bias (a judge that always
    says "Image 1" gets exactly 0.5). Tasks without ties (understanding) have P(tie) = 0. A record
    whose prompt does not fit max_len gets a row of NaN.
    """
    out = torch.zeros(len(records), 3)
    for task in TASKS:
        idx = [i for i, r in enumerate(records) if r["task"] == task]
        if not idx:
            continue
        cands = verdict_candidates(task, "pairwise")
        col = {value: k for k, (value, _) in enumerate(cands)}
        orders = [(records[i], media[i]) for i in idx]
        if both_orders:
            orders += [swapped(records[i], media[i]) for i in idx]
        prompts = [(m, render_question(task, "pairwise", r["prompt"], r.get("responses", ()), template=template))
                   for r, m in orders]
        p = answer_probs(model, processor, prompts, [a for _, a in cands], device, batch_size, max_len)
        tie = p[:, col[0]] if 0 in col else torch.zeros(len(p))
        n = len(idx)
        first, second, tie_ = p[:n, col[1]], p[:n, col[2]], tie[:n]
        if both_orders:  # in the swapped order "2 is better" means the original first one is better
            first, second, tie_ = (first + p[n:, col[2]]) / 2, (second + p[n:, col[1]]) / 2, (tie_ + tie[n:]) / 2
        out[idx] = torch.stack([first, second, tie_], 1)
    return out


@torch.no_grad()
def judge_pointwise(model, processor, records, media, device, template="short", batch_size=16, max_len=4096):
    """Expected score and most likely score for each pointwise record: two (N,) float tensors.

    The expected score sum_s s * P("Final Score: s") is a finer signal than the argmax for ranking.
    Both are NaN for a record whose prompt does not fit max_len.
    """
    expected, best = torch.zeros(len(records)), torch.zeros(len(records))
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault((r["task"], tuple(r["scale"])), []).append(i)
    for (task, scale), idx in groups.items():
        cands = verdict_candidates(task, "pointwise", scale)
        values = torch.tensor([float(v) for v, _ in cands])
        prompts = [(media[i], render_question(task, "pointwise", records[i]["prompt"],
                                              records[i].get("responses", ()), scale, template)) for i in idx]
        p = answer_probs(model, processor, prompts, [a for _, a in cands], device, batch_size, max_len)
        expected[idx] = p @ values
        best[idx] = torch.where(p.isnan().any(1), float("nan"), values[p.nan_to_num(-1).argmax(1)])
    return expected, best


@torch.no_grad()
def generate(model, processor, prompts, device, max_new_tokens=32, temperature=0.0, n=1,
             batch_size=16) -> list[list[str]]:
    """n free-text answers for each (media, question) prompt, decoded token by token with a KV cache.

    Each prompt is encoded once: one processor call, one vision-tower run and one prefill per batch of
    `batch_size` prompts. The prefill's cache is then copied n times along the batch, so the n samples
    share everything up to the first new token (03 draws N=10 answers per prompt: re-encoding the prompt
    for each would run the processor, the tower and the prefill ten times). Greedy when temperature is 0,
    else plain temperature sampling from softmax(logits / T) (the paper samples at 0.7; no top-k / top-p).
    Prompts are left-padded so every row's new tokens follow its prompt directly. A row stops at the
    checkpoint's end-of-turn token. Returns per prompt a list of n strings.
    """
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    stop = torch.tensor(eos if isinstance(eos, list) else [eos], device=device)
    texts = []
    for i in range(0, len(prompts), batch_size):
        encs = encode_many(processor, [(m, q, None) for m, q in prompts[i:i + batch_size]])
        visual_tokens(model, encs, device)
        batch = to_device(collate(encs, tok.pad_token_id, side="left"), device)
        mask = batch["attention_mask"]
        # M-RoPE positions of the prompt (3, B, L): media tokens get (time, row, column), text one step
        # each. Every new token is a text token one past the prompt's largest position.
        positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                                                  batch.get("second_per_grid_ts"), attention_mask=mask)
        with autocast(device):
            out = model.model(**model_inputs(batch), position_ids=positions, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(n)                               # (B*n, heads, L, d) per layer
        logits = model.lm_head(out.last_hidden_state[:, -1]).float().repeat_interleave(n, 0)   # (B*n, V)
        mask = mask.repeat_interleave(n, 0)
        next_pos = (positions.amax((0, 2)) + 1).repeat_interleave(n, 0)                         # (B*n,)
        done = torch.zeros(len(logits), dtype=torch.bool, device=device)
        new = []
        for step in range(max_new_tokens):
            if temperature > 0:
                token = torch.multinomial((logits / temperature).softmax(-1), 1)[:, 0]
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(done, tok.pad_token_id)         # finished rows only pad
            new.append(token)
            done |= torch.isin(token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = F.pad(mask, (0, 1), value=1)
            with autocast(device):
                h = model.model(input_ids=token[:, None], attention_mask=mask, cache=cache, use_cache=True,
                                position_ids=next_pos.view(1, -1, 1).expand(3, -1, 1)).last_hidden_state
            logits = model.lm_head(h[:, -1]).float()
            next_pos = next_pos + 1
        texts += tok.batch_decode(torch.stack(new, 1), skip_special_tokens=True)
    return [texts[j * n:(j + 1) * n] for j in range(len(prompts))]


# ---------------------------------------------------------------------------------------------
# judging records: what 01, 02 and 05 check, what 02 and 05 score, what 03 and 05 generate

def check_record(r: dict, data_dir) -> str | None:
    """Why a unified record cannot be used, or None. Media are checked for existence here and for
    readability when they are loaded."""
    if r.get("task") not in TASKS:
        return f"unknown task: {r.get('task')!r}"
    if r.get("kind") not in KINDS:
        return f"unknown kind: {r.get('kind')!r}"
    if not r.get("media"):
        return "no media"
    for m in r["media"]:
        for p in (m if isinstance(m, (list, tuple)) else [m]):
            if not (Path(data_dir) / p).exists():
                return f"missing media: {p}"
    if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
        return "no question/answer text"
    if r["kind"] == "pairwise" and r.get("label") not in (0, 1, 2):
        return f"bad pairwise label: {r.get('label')!r}"
    if r["kind"] == "pointwise":
        lo, hi = r.get("scale") or (None, None)
        if lo is None or not isinstance(r.get("score"), (int, float)) or not lo <= r["score"] <= hi:
            return f"score {r.get('score')!r} outside scale {r.get('scale')!r}"
    return None


def pairwise_verdict(p, ties: bool = True) -> int | None:
    """[P(first), P(second), P(tie)] -> 1, 2 or 0 (tie); None when the highest probability is shared
    (a judge with no preference), which no position may win. With ties=False, a forced choice."""
    options = (1, 2, 0) if ties else (1, 2)
    top = max(p[k] for k in range(len(options)))
    best = [options[k] for k in range(len(options)) if p[k] == top]
    return best[0] if len(best) == 1 else None


def pair_accuracy(probs, labels) -> dict:
    """The two pairwise accuracies every benchmark reports, from [P(first), P(second), P(tie)] rows:
    diff = accuracy on the pairs that are not ties, where a tie verdict is wrong (nan when there are none);
    tau  = accuracy on all pairs, ties included (right on a true tie only when the judge says tie).
    The verdict is the most likely option. Two options exactly equally likely, a judge with no
    preference, earn half a point: no position wins by default, so such a judge scores at chance
    whatever the order of a benchmark's items. A row of zeros (an unparsed verdict) is wrong in both."""
    def credit(p, lab) -> float:
        if sum(p) <= 0:
            return 0.0
        top = max(p)
        winners = [v for v, q in zip((1, 2, 0), p) if q == top]
        return (lab in winners) / len(winners)
    strict = [(p, lab) for p, lab in zip(probs, labels) if lab != 0]
    return {"diff": sum(credit(p, lab) for p, lab in strict) / len(strict) if strict else float("nan"),
            "tau": sum(credit(p, lab) for p, lab in zip(probs, labels)) / len(labels) if labels else float("nan"),
            "n": len(labels), "ties": len(labels) - len(strict)}


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties; nan when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):            # ties share their average rank
            r[v == value] = r[v == value].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def judge_by_generating(model, processor, records, media, device, template="short", max_new_tokens=512,
                        batch_size=8) -> list:
    """For judges that reason before the verdict (the released ones do): greedy `generate`, then
    strict parsing. Pairwise records are judged in both orders; returns per record the label
    (1, 2, 0 = tie) or score, or None when the output states no usable verdict (counted by callers).
    When the two orders disagree the result is None rather than a guess."""
    prompts, index = [], []
    for i, (r, m) in enumerate(zip(records, media)):
        orders = [(r, m), swapped(r, m)] if r["kind"] == "pairwise" else [(r, m)]
        for rr, mm in orders:
            prompts.append((mm, render_question(rr["task"], rr["kind"], rr["prompt"], rr.get("responses", ()),
                                                rr.get("scale"), template)))
            index.append(i)
    texts = [t[0] for t in generate(model, processor, prompts, device, max_new_tokens, batch_size=batch_size)]
    out = []
    for i, r in enumerate(records):
        verdicts = [parse_verdict(t, r["task"], r["kind"], r.get("scale")) for t, j in zip(texts, index) if j == i]
        if r["kind"] == "pairwise" and len(verdicts) == 2 and verdicts[1] is not None:
            verdicts[1] = {1: 2, 2: 1, 0: 0}[verdicts[1]]          # back to the original order
        found = {v for v in verdicts if v is not None}
        out.append(found.pop() if len(found) == 1 else None)
    return out

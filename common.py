"""Shared plumbing of the UnifiedReward pipeline: only what two or more stages use.

The model's side lives in vlm.py (loading, batches, log-probs, sampling) and the judge's in judging.py
(templates, the one-forward verdicts, benchmark accuracies); the generators' in diffusion.py.
Sections, in the order a reader meets them in the stages:
  config + run helpers        a @dataclass Config from the command line, seeds, device, autocast, the
                              checks that stop a stage before any work (missing input, unwritable output)
  several processes           torchrun: process group, sums across ranks, DDP / FSDP2 wrapping
  files                       jsonl I/O, the skip log, atomic checkpoint writes
  media                       images (PIL) and videos (decord, 8 uniformly spaced frames)
  unified records             what makes a record usable
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
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TASKS = ("image_generation", "image_understanding", "video_generation", "video_understanding")
KINDS = ("pairwise", "pointwise")
ROOT = Path(__file__).resolve().parent   # the repository: default paths (runs/toy/..., toy/base) are relative to it


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
        # Leave the group before the interpreter tears down, also when a stage stops on an error.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), dist.get_world_size()


def exit_distributed() -> None:
    """End a torchrun rank whose stage finished: leave the group and exit at once. A rank whose work is
    done and saved can still abort while the interpreter tears down ("terminate called without an
    active exception", exit -6, in 2 of 8 runs of the CPU torchrun tests even with the group destroyed
    first). The stages call this after main() returns, so an error still exits with its own code."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
# unified records

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

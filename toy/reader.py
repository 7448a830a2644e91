"""The toy world's GenEval: read a generated picture or clip back into the attributes its caption names,
from the pixels alone (GenEval, Ghosh et al. 2023, does this with an object detector; here the world is
simple enough to read exactly). 05 scores the generators with it before and after Diffusion-DPO, and
it measures the precision of the judge's generation pairs.

The square is the largest blob far from the known backdrop: its palette colour is the nearest to the
blob's brightest pixels with the backdrop's light taken off, its position the edge nearest its centroid,
its size its area (pictures) or its extent across the motion (clips), and a clip's direction the way its
centroid travels from the first frame to the last.
"""
from __future__ import annotations

import collections

import numpy as np
from PIL import Image

from toy import world

PALETTE = np.array(list(world.COLOURS.values()), np.float32)
NAMES = list(world.COLOURS)
R = 32          # read at the generators' 32 px: the box filter averages a noise defect away
FAR = 90        # summed |pixel - backdrop| over the channels, after a 3x3 mean, that marks the square
SCALE = world.PX // R
QUANTILE = 0.8     # the colour is read from the blob's strongest fifth: a blurred or trailing edge is mixed


def _at(frame: np.ndarray, size: int = R) -> np.ndarray:
    if frame.shape[0] == size:
        return frame.astype(np.float32)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BOX), np.float32)


BACKDROP = _at(world.BACKGROUND)


def _largest_blob(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected component of a (H, W) bool mask, as a mask; None when empty."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, n = None, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = n
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return None if best is None else labels == best


def _blob(frame: np.ndarray):
    """(mask, colour name) of the square in one (H, W, 3) uint8 frame, or (None, None)."""
    f = _at(frame)
    diff = np.abs(f - BACKDROP).sum(-1)
    padded = np.pad(diff, 1, mode="edge")
    smooth = sum(padded[dy:dy + R, dx:dx + R] for dy in range(3) for dx in range(3)) / 9
    mask = _largest_blob(smooth > FAR)
    if mask is None:
        return None, None
    lit = f[mask] - (BACKDROP[mask] - 40)   # the square takes the backdrop's light
    strongest = lit[diff[mask] >= np.quantile(diff[mask], QUANTILE)]
    colour = NAMES[int(((PALETTE[None] - strongest.mean(0)[None]) ** 2).sum(-1).argmin())]
    return mask, colour


def read_image(pixels: np.ndarray) -> dict:
    """(H, W, 3) uint8 -> {colour, position, size}, each None when no square is found."""
    mask, colour = _blob(pixels)
    if mask is None:
        return {"colour": None, "position": None, "size": None}
    ys, xs = np.nonzero(mask)
    cy, cx, last = ys.mean(), xs.mean(), R - 1
    gaps = {"top": cy, "bottom": last - cy, "left": cx, "right": last - cx}
    size = "large" if mask.sum() * SCALE ** 2 > world.SIZES["small"] * world.SIZES["large"] else "small"
    return {"colour": colour, "position": min(gaps, key=gaps.get), "size": size}


def read_video(frames: np.ndarray) -> dict:
    """(F, H, W, 3) uint8 -> {colour, direction, size}, each None when no square is found."""
    blobs = [_blob(f) for f in frames]
    found = [(m, c) for m, c in blobs if m is not None]
    if len(found) < 2:
        return {"colour": None, "direction": None, "size": None}
    colours = [c for _, c in found]
    centres = np.array([np.argwhere(m).mean(0) for m, _ in found])          # (F', 2) as (y, x)
    dy, dx = centres[-1] - centres[0]
    direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    # across the motion the blob is as wide as the square (the trail lies along the motion)
    axis = 0 if direction in ("left", "right") else 1
    across = SCALE * np.median([np.ptp(np.argwhere(m)[:, axis]) + 1 for m, _ in found])
    small, large = world.VIDEO_SIZES["small"], world.VIDEO_SIZES["large"]
    # the colour most frames show; a tie goes to the one read first (a set's order would change with
    # each process's string hashing, and so would 05's figures)
    return {"colour": collections.Counter(colours).most_common(1)[0][0], "direction": direction,
            "size": "large" if across > (small + large) / 2 else "small"}


def read(medium: str, pixels: np.ndarray) -> dict:
    return (read_image if medium == "image" else read_video)(pixels)


def caption_right(medium: str, scene: dict, pixels: np.ndarray) -> dict[str, bool]:
    """Which of the caption's attributes the medium shows: {attr: bool} for world.CAPTION_ATTRS[medium]."""
    seen = read(medium, pixels)
    return {a: seen[a] == scene[a] for a in world.CAPTION_ATTRS[medium]}

"""How 02 feeds the judge's fine-tune: endless shuffled micro-batches of encoded examples.

This is plumbing for real scale, not the method (02's loss reads what it hands over): DataLoader
workers read media and run the processor while the model trains; each example is encoded once and
kept while the whole set fits in memory; the frozen vision tower's tokens replace the pixels; under
torchrun each rank encodes only its share of every global batch; micro-batches can be regrouped by
length so that no short verdict is padded to a long critique; a checkpoint keeps the draws, so a
resumed run draws what an uninterrupted one would.

A micro-batch is (collated batch, kinds (B,), decisive (B,)): the batch as `vlm.collate` builds it,
each example's "pairwise" / "pointwise", and for a strict pair the position of the token where the
right verdict and the wrong one part, with both tokens (02's Bradley-Terry term), else None.
"""
from __future__ import annotations

import collections
import random
from pathlib import Path

import torch

import common
import judging
import vlm


def decisive_tokens(tokenizer, record) -> tuple[int, int, int] | None:
    """(depth into the answer, right token, wrong token) for a strict pairwise record, else None."""
    if record["kind"] != "pairwise" or record["label"] not in (1, 2):
        return None
    answers = [judging.render_answer(record["task"], "pairwise", label=lab) for lab in (record["label"], 3 - record["label"])]
    _, steps = judging.decision_path(tokenizer, answers)
    depth, tokens = steps[-1]
    return depth, tokens[0], tokens[1]


def encode_records(records, keys, processor, cfg) -> list[tuple]:
    """[(key, encoded example, decisive (position, right token, wrong token) or None, error or None)] for
    records[key]. This is the work a DataLoader worker does: read the media, run the processor (one call
    for the batch: 2.9 -> 1.2 ms per toy example), find the decisive token. A record whose media cannot
    be read, or which does not fit max_len, comes back with its error instead of an example."""
    out, new = {}, {}
    for k in dict.fromkeys(keys):
        try:
            new[k] = common.load_media(records[k]["media"], cfg.data_dir)
        except common.MediaError as err:
            out[k] = (k, None, None, str(err))
    # train on the record's own question: rendered by 01 for the toy, verbatim for released data
    examples = [(media, records[k]["question"], records[k]["answer"]) for k, media in new.items()]
    try:
        encs = vlm.encode_many(processor, examples, cfg.max_len) if examples else []
    except vlm.TooLong:                   # one at a time, to find which
        encs = []
        for k, ex in zip(new, examples):
            try:
                encs.append(vlm.encode(processor, *ex, cfg.max_len))
            except vlm.TooLong as err:
                out[k] = (k, None, None, str(err))
                encs.append(None)
    for k, e in zip(new, encs):
        if e is not None:
            d = decisive_tokens(processor.tokenizer, records[k])
            prompt_len = int((~e["answer_mask"]).sum())
            out[k] = (k, e, None if d is None else (prompt_len + d[0], d[1], d[2]), None)
    return [out[k] for k in dict.fromkeys(keys)]


def as_is(item):
    return item


class Encoder(torch.utils.data.Dataset):
    """What the DataLoader's workers run: a tuple of record indices -> encode_records of them."""

    def __init__(self, records, processor, cfg):
        self.records, self.processor, self.cfg = records, processor, cfg

    def __getitem__(self, keys):
        return encode_records(self.records, keys, self.processor, self.cfg)


def length_groups(lengths: list[int], k: int, rng: random.Random) -> list[list[int]]:
    """Indices into lengths (n,) in k micro-batches of similar lengths and about equal padded tokens.

    A collated micro-batch costs size x its longest member in compute and memory; k random micro-batches
    of a mixed set pad a short verdict to the longest critique beside it. Sorted by length and cut where
    size x longest would pass a budget, the smallest budget that needs at most k cuts, the groups pad
    little and cost about the same (many short examples or few long ones). Groups come out in a shuffled
    order (no short-to-long curriculum); fewer than k examples leave some groups empty."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))

    def pack(budget):
        groups, cur = [], []
        for i in order:   # ascending: the newest member is the longest
            if cur and (len(cur) + 1) * lengths[i] > budget:
                groups.append(cur)
                cur = []
            cur.append(i)
        return groups + [cur] * bool(cur)

    lo, hi = max(lengths, default=0), max(lengths, default=0) * len(lengths)
    while lo < hi:    # the smallest budget that packs into <= k groups
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(pack(mid)) <= k else (mid + 1, hi)
    groups = pack(lo)
    while len(groups) < k and any(len(g) > 1 for g in groups):   # use all k: halve the costliest
        g = max((g for g in groups if len(g) > 1), key=lambda g: len(g) * lengths[g[-1]])
        at = groups.index(g)
        groups[at:at + 1] = [g[:len(g) // 2], g[len(g) // 2:]]
    groups += [[] for _ in range(k - len(groups))]
    rng.shuffle(groups)
    return groups


class Batches:
    """Endless shuffled micro-batches of encoded examples, fed by a DataLoader whose workers read media
    and run the processor while the model trains.

    The order of draws is fixed by the seed alone (epochs of shuffles), so the loader can run ahead of
    training. An example whose media cannot be read, or which does not fit max_len, is left out of its
    batch (one example fewer), logged once, and never encoded again. While the whole encoded set fits in
    memory (`fits_in_memory`), each example is kept after its first encoding and later epochs need no
    workers at all. Given the model whose vision tower is frozen (`frozen`), examples carry that tower's
    output instead of pixels, computed here in the main process on the GPU. Under torchrun every rank
    draws the same global batches and encodes only its share of each (every world-th draw). With
    cfg.length_groups = k > 1, k micro-batches are drawn and encoded together and handed out regrouped
    by length (length_groups); each rank regroups its own share into k."""

    def __init__(self, records, processor, cfg, skips, seed, frozen=None, device="cpu", rank=0, world=1):
        self.records, self.processor, self.cfg, self.skips = records, processor, cfg, skips
        self.rank, self.world = rank, world
        self.frozen, self.device = frozen, device
        self.rng = random.Random(seed)
        self.order, self.pos, self.bad = [], 0, set()
        self.cache: dict[int, tuple] = {}   # record index -> (encoded example, decisive position)
        self.caching = cfg.cache_gb > 0     # decided for good once 64 examples show their size (fits_in_memory)
        self.projected_gb = None
        self.pending = collections.deque()  # per micro-batch the loader has been asked for: (its draws, state)
        self.consumed = self._drawn()       # the draw state after the last micro-batch handed to training
        self.loader = None
        self.seed, self.groups = seed, []   # the window's regrouped micro-batches not yet handed out

    def _drawn(self, taken: int = 0) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "pos": self.pos, "taken": taken}

    def state(self) -> dict:
        """What a checkpoint keeps: the draws as training has consumed them (the loader runs ahead). In
        the middle of a window of length groups: the state before the window and the groups taken."""
        return {**self.consumed, "bad": sorted(self.bad)}

    def load_state(self, s: dict) -> None:
        self.consumed = {k: s[k] for k in ("rng", "order", "pos", "taken")}
        self.bad, self.loader = set(s["bad"]), None

    def _next_record(self) -> int:
        if self.pos >= len(self.order):
            self.order = list(range(len(self.records)))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]

    def _requests(self):
        """The loader's sampler: per micro-batch, the indices of this rank's draws still to be encoded."""
        while True:
            mine = [self._next_record() for _ in range(self.cfg.batch_size)][self.rank::self.world]
            self.pending.append((mine, self._drawn()))
            yield tuple(k for k in mine if k not in self.cache and k not in self.bad)

    def _loader(self):
        workers = self.cfg.workers
        return iter(torch.utils.data.DataLoader(
            Encoder(self.records, self.processor, self.cfg), sampler=self._requests(), batch_size=None,
            num_workers=workers, collate_fn=as_is, pin_memory=self.device == "cuda",
            prefetch_factor=4 if workers else None, persistent_workers=workers > 0))

    def fits_in_memory(self) -> None:
        """Project the cache's size for the whole set from the examples cached so far; past cache_gb, stop
        caching (a real data set of 236k examples does not fit) and say so."""
        per = sum(t.nbytes for e, _ in self.cache.values() for t in e.values()) / len(self.cache)
        self.projected_gb = per * len(self.records) / 2**30
        if self.projected_gb > self.cfg.cache_gb:
            self.caching = False
            self.cache.clear()
            print(f"cache off: {len(self.records)} encoded examples would take {self.projected_gb:.1f} GB "
                  f"(> --cache-gb {self.cfg.cache_gb:g}); each is encoded when drawn")
        else:
            print(f"cache on: {len(self.records)} encoded examples take about {self.projected_gb:.2f} GB")

    def next(self):
        """-> (collated batch, kinds (B,), decisive (B,)): this rank's share of a global batch of batch_size.
        A micro-batch whose every example was skipped is passed over for the next one."""
        while True:
            batch, kinds, decisive = self._next()
            if kinds:
                return batch, kinds, decisive
            if len(self.bad) == len(self.records):
                raise RuntimeError(f"every training record was skipped; see {self.skips.path}")

    def _next(self):
        if self.loader is None:            # (re)started from the consumed state: resuming draws the same
            self.rng.setstate(self.consumed["rng"])
            self.order, self.pos = list(self.consumed["order"]), self.consumed["pos"]
            self.pending.clear()
            self.loader, self.groups = self._loader(), []
            taken = self.consumed["taken"]
            if taken:                      # resumed inside a window: form it again, pass what was taken
                self._regroup()
                self.groups = self.groups[taken:]
                self.consumed["taken"] = taken
        if self.cfg.length_groups == 1:
            picks, self.consumed = self._take()
        else:
            if not self.groups:
                self._regroup()
            picks = self.groups.pop(0)
            self.consumed = {**self.consumed, "taken": self.cfg.length_groups - len(self.groups)}
            if not self.groups:            # window used up: the draws after it
                self.consumed = self.window_end
        return self._collate(picks)

    def _regroup(self) -> None:
        """Take cfg.length_groups micro-batches of draws and cut them anew by length."""
        start = self.consumed
        picks = [p for _ in range(self.cfg.length_groups) for p in self._take()[0]]
        _, self.window_end = self.pending_state
        lengths = [int(e["input_ids"].shape[0]) for _, (e, _) in picks]
        rng = random.Random(f"{self.seed}:{[k for k, _ in picks]}")
        self.groups = [[picks[i] for i in g] for g in length_groups(lengths, self.cfg.length_groups, rng)]
        self.consumed = {**start, "taken": 0}

    def _take(self):
        """-> ([(record index, (encoded example, decisive))], the draw state after them): the next
        micro-batch's examples from the loader (or the cache); bad ones dropped and logged."""
        got = {k: (e, d, err) for k, e, d, err in next(self.loader)}
        mine, after = self.pending_state = self.pending.popleft()
        missing = [k for k in mine if k not in got and k not in self.cache and k not in self.bad]
        for k, e, d, err in encode_records(self.records, missing, self.processor, self.cfg):
            got[k] = (e, d, err)           # dropped from the cache after the loader was asked: rare
        picks = []
        for k in mine:
            if k in self.cache:
                picks.append((k, self.cache[k]))
            elif k in got and got[k][2] is None:
                picks.append((k, got[k][:2]))
                if self.caching:
                    self.cache[k] = got[k][:2]
            elif k in got:
                self.bad.add(k)
                self.skips.add(Path(self.cfg.data_dir) / "reward_train.jsonl", self.records[k]["id"], got[k][2])
        return picks, after

    def _collate(self, picks):
        encs = [e for _, (e, _) in picks]
        if self.frozen is not None:
            vlm.visual_tokens(self.frozen, encs, self.device)
        if self.caching and self.projected_gb is None and len(self.cache) >= 64:
            self.fits_in_memory()
        batch = vlm.collate(encs, self.processor.tokenizer.pad_token_id) if encs else None
        if batch is not None and self.device == "cuda":   # page-locked: the copy to the GPU runs asynchronously
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, [self.records[k]["kind"] for k, _ in picks], [d for _, (_, d) in picks]

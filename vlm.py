"""The vision-language model, as the stages use it: only what two or more stages use.

Sections, in the order a reader meets them in the stages:
  models             loading any Qwen2.5-VL checkpoint and its processor (the tiny toy one is built in
                     toy/), training mode, the optimizers and their bytes per parameter
  batches            chat template -> token ids, answer mask, padding; the vision tower run once per medium
  log-probabilities  answer log-probs under teacher forcing (02's loss, 04's DPO)
  sampling           free-text answers with a KV cache (03's candidates, 05's policy answers)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import common

END_OF_TURN = "<|im_end|>"  # Qwen's chat format closes every turn with this token; the judge learns to emit it


# ---------------------------------------------------------------------------------------------
# models

def load_model(name_or_path, device="cpu", train=False, precision="fp32"):
    """Any Qwen2.5-VL checkpoint (hub id or local folder) through the same calls a hub user makes.

    Weights are fp32 on CPU. On CUDA they are bf16 for judging and sampling. For training they are fp32
    (`precision="fp32"`), with the math in bf16 under `common.autocast`: AdamW's steps at fine-tuning learning
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
    parts = [{"type": "video" if isinstance(m, common.Video) else "image"} for m in media]
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
    images = [m for media, _, _ in examples for m in media if not isinstance(m, common.Video)]
    videos = [m for media, _, _ in examples for m in media if isinstance(m, common.Video)]
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
            n = sum((name == "video") == isinstance(m, common.Video) for m in media)
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
    Visual tokens computed beforehand (image_embeds / video_embeds: (tokens, H), see `visual_tokens`)
    go in as the vision tower's output, which the model then skips running."""
    inputs = {k: v for k, v in batch.items() if k not in ("answer_mask", "image_embeds", "video_embeds")}
    if "image_embeds" in batch or "video_embeds" in batch:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        inputs["mm_encoder_outputs"] = {m: BaseModelOutputWithPooling(pooler_output=(batch[f"{m}_embeds"],))
                                        for m in ("image", "video") if f"{m}_embeds" in batch}
    return inputs


@torch.no_grad()
def visual_tokens(model, encs: list[dict], device, memo: dict | None = None) -> None:
    """Replace each example's pixels by the vision tower's output, in place, running the tower once
    per distinct medium.

    pixel_values (patches, C*T*P*P) -> image_embeds (tokens, H), one row per <|image_pad|> token;
    likewise pixel_values_videos -> video_embeds. The tower sees each medium on its own (its attention
    never crosses media), so a medium shown by several sequences needs its tokens once: 03 judges each
    understanding prompt's picture in 20 sequences, and each generated candidate in three. `memo`
    (pixels -> tokens, on the CPU) carries them across calls, so across batches. In 02, whose tower is
    frozen, the cache then keeps tokens instead of pixels. The tokens equal the forward's own (tested),
    so results do not change."""
    memo = {} if memo is None else memo
    for medium, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                 ("video", "pixel_values_videos", "video_grid_thw")):
        has = list({id(e): e for e in encs if pixels in e}.values())
        if not has:
            continue
        parts, new = [], {}                          # each example's media as keys; media not in memo yet
        for e in has:
            mine = []
            for rows, g in zip(torch.split(e[pixels], e[grid].prod(-1).tolist()), e[grid]):
                key = (medium, tuple(g.tolist()), rows.numpy().tobytes())    # equal pixels, equal tokens
                if key not in memo:
                    new.setdefault(key, (rows, g))
                mine.append(key)
            parts.append(mine)
        if new:
            tower = model.model.get_image_features if medium == "image" else model.model.get_video_features
            with common.autocast(device):
                out = tower(torch.cat([r for r, _ in new.values()]).to(device),
                            torch.stack([g for _, g in new.values()]).to(device)).pooler_output  # per medium
            memo.update((key, tokens.cpu()) for key, tokens in zip(new, out))
        for e, mine in zip(has, parts):
            e[f"{medium}_embeds"] = torch.cat([memo[k] for k in mine])
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
# sampling

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
        with common.autocast(device):
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
            with common.autocast(device):
                h = model.model(input_ids=token[:, None], attention_mask=mask, cache=cache, use_cache=True,
                                position_ids=next_pos.view(1, -1, 1).expand(3, -1, 1)).last_hidden_state
            logits = model.lm_head(h[:, -1]).float()
            next_pos = next_pos + 1
        texts += tok.batch_decode(torch.stack(new, 1), skip_special_tokens=True)
    return [texts[j * n:(j + 1) * n] for j in range(len(prompts))]

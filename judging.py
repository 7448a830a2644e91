"""The judge's side of the pipeline: only what two or more stages use.

Sections, in the order a reader meets them in the stages:
  prompts and answers         the judge's question templates, answer strings, strict parsing
  judging without generating  the one-forward readout of verdicts and scores (DESIGN.md section 6)
  benchmarks                  pairwise accuracies, rank correlation, judging by generating + parsing
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

import common
import vlm


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
# judging without generating (DESIGN.md section 6)
#
# The judge's possible answers ("Image 1 is better than Image 2.", "Both images are equally good.",
# "Final Score: 4", ...) differ only at a few decisive tokens. Teacher-force the one token path that
# passes through every point where they diverge, read the next-token log-probs there, and each
# answer's probability is the product along its branch: one forward pass instead of `vlm.generate`
# followed by string parsing, and a probability instead of a hard verdict.

def decision_path(tokenizer, answers: list[str]):
    """Where the candidate answers diverge, as token ids.

    Returns (path, steps): `path` is the token sequence to teacher-force after the prompt; `steps` is
    a list of (depth, {candidate index: token id at that depth}) for every divergence point. Raises
    ValueError when the answers branch along more than one path (e.g. a 0-100 scale), which cannot be
    read from one forward pass.
    """
    seqs = [tokenizer(a + vlm.END_OF_TURN, add_special_tokens=False)["input_ids"] for a in answers]
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
def answer_probs(model, processor, prompts, answers: list[str], device, batch_size=16, max_len=4096,
                 memo: dict | None = None) -> torch.Tensor:
    """P(answer k | prompt i) over a fixed set of candidate answers: (N, K), rows sum to 1.

    prompts: list of (media, question). One forward pass per batch of prompts. A prompt that does not
    fit max_len together with the verdict gets a row of NaN (callers skip and count it), never a
    truncated one. `memo` keeps the vision tower's tokens of each medium across batches and calls
    (vlm.visual_tokens); one per call when not given.
    """
    memo = {} if memo is None else memo
    path, steps = decision_path(processor.tokenizer, answers)
    path = torch.tensor(path, dtype=torch.long)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [(media, question, None) for media, question in prompts[i:i + batch_size]]
        try:
            encs, fits = vlm.encode_many(processor, chunk, max_len - len(path)), [True] * len(chunk)
        except vlm.TooLong:                          # one at a time, to find which
            encs, fits = [], []
            for example in chunk:
                try:
                    encs.append(vlm.encode(processor, *example, max_len=max_len - len(path)))
                    fits.append(True)
                except vlm.TooLong:
                    fits.append(False)
        rows_out = torch.full((len(chunk), len(answers)), float("nan"))
        if not encs:
            out.append(rows_out)
            continue
        vlm.visual_tokens(model, encs, device, memo)   # a medium shown by several prompts: its tokens once
        for e in encs:
            e["prompt_len"] = len(e["input_ids"])
            e["input_ids"] = torch.cat([e["input_ids"], path])
            e["mm_token_type_ids"] = F.pad(e["mm_token_type_ids"], (0, len(path)))
            e["answer_mask"] = F.pad(e["answer_mask"], (0, len(path)))
        batch = vlm.to_device(vlm.collate(encs, processor.tokenizer.pad_token_id), device)
        with common.autocast(device):
            h = vlm.hidden_states(model, batch)                                 # (B, L, H)
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
                   batch_size=16, max_len=4096, memo=None) -> torch.Tensor:
    """P(first better), P(second better), P(tie) for each pairwise record: (N, 3).

    Judged in both orders and averaged, which cancels the judge's position bias (a judge that always
    says "Image 1" gets exactly 0.5). Tasks without ties (understanding) have P(tie) = 0. A record
    whose prompt does not fit max_len gets a row of NaN.
    """
    out = torch.zeros(len(records), 3)
    for task in common.TASKS:
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
        p = answer_probs(model, processor, prompts, [a for _, a in cands], device, batch_size, max_len, memo)
        tie = p[:, col[0]] if 0 in col else torch.zeros(len(p))
        n = len(idx)
        first, second, tie_ = p[:n, col[1]], p[:n, col[2]], tie[:n]
        if both_orders:  # in the swapped order "2 is better" means the original first one is better
            first, second, tie_ = (first + p[n:, col[2]]) / 2, (second + p[n:, col[1]]) / 2, (tie_ + tie[n:]) / 2
        out[idx] = torch.stack([first, second, tie_], 1)
    return out


@torch.no_grad()
def judge_pointwise(model, processor, records, media, device, template="short", batch_size=16, max_len=4096,
                    memo=None):
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
        p = answer_probs(model, processor, prompts, [a for _, a in cands], device, batch_size, max_len, memo)
        expected[idx] = p @ values
        best[idx] = torch.where(p.isnan().any(1), float("nan"), values[p.nan_to_num(-1).argmax(1)])
    return expected, best


# ---------------------------------------------------------------------------------------------
# benchmarks: what 02 and 05 score, and judging by generating for judges that reason first

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
    """For judges that reason before the verdict (the released ones do): greedy `vlm.generate`, then
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
    texts = [t[0] for t in vlm.generate(model, processor, prompts, device, max_new_tokens, batch_size=batch_size)]
    out = []
    for i, r in enumerate(records):
        verdicts = [parse_verdict(t, r["task"], r["kind"], r.get("scale")) for t, j in zip(texts, index) if j == i]
        if r["kind"] == "pairwise" and len(verdicts) == 2 and verdicts[1] is not None:
            verdicts[1] = {1: 2, 2: 1, 0: 0}[verdicts[1]]          # back to the original order
        found = {v for v in verdicts if v is not None}
        out.append(found.pop() if len(found) == 1 else None)
    return out

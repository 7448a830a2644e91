"""Where a toy policy goes wrong: its greedy answers to the held-out questions, broken down (run after 04).

05 reports one accuracy per medium for the policy before and after DPO. To see *which* mistakes DPO
fixed, this tool answers the same held-out questions with both policies, exactly as 05 does (greedy,
05's `normalize`), and counts per question form ("What colour is the square and where is it?"):

  right           both attributes right
  first wrong     the first attribute asked for is wrong, the second right ("blue, left" for "red, left")
  second wrong    the other way round
  both wrong
  other form      not two comma-separated attributes ("red, left, large", "red")

beside the number of 03's kept pairs whose prompt is that question. DPO can only fix the mistakes that
its pairs show, so a form with many mistakes and few pairs is where it gains little.

    python tools/policy_errors.py                                # toy/base vs runs/toy/policy
    python tools/policy_errors.py --after runs/x/policy --pairs runs/x/pairs/pairs.jsonl
"""
import argparse
import collections
import importlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

evaluation = importlib.import_module("05_eval")
KINDS = ("right", "first wrong", "second wrong", "both wrong", "other form")


def error_kind(truth: str, answer: str) -> str:
    """One of KINDS for a two-attribute answer ("red, left") against the true one."""
    t, a = evaluation.normalize(truth).split(", "), evaluation.normalize(answer).split(", ")
    if len(a) != len(t) or len(t) != 2:
        return "other form"
    wrong = [x != y for x, y in zip(t, a)]
    return {(False, False): "right", (True, False): "first wrong", (False, True): "second wrong",
            (True, True): "both wrong"}[tuple(wrong)]


def table(prompts: list[dict], answers: dict[str, list[str]], pairs_per_question: dict[str, int]) -> str:
    """Markdown: one row per (medium, question form) and policy, the counts of each kind of answer."""
    counts = collections.Counter()
    for name, texts in answers.items():
        for p, a in zip(prompts, texts):
            counts[(p["task"], p["question"], name, error_kind(p["answer"], a))] += 1
    lines = ["| task | question | policy | " + " | ".join(KINDS) + " | kept pairs (03) |",
             "|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for task, question in sorted({(p["task"], p["question"]) for p in prompts}):
        for name in answers:
            row = " | ".join(str(counts[(task, question, name, k)]) for k in KINDS)
            lines.append(f"| {task} | {question} | {name} | {row} | {pairs_per_question.get((task, question), 0)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="runs/toy/data", help="01's folder with prompts_test.jsonl")
    ap.add_argument("--before", default="toy/base", help="the policy before DPO")
    ap.add_argument("--after", default="runs/toy/policy", help="the policy after DPO")
    ap.add_argument("--pairs", default="runs/toy/pairs/pairs.jsonl", help="03's pairs ('' = none)")
    args = ap.parse_args()
    cfg = evaluation.Config(data_dir=args.data_dir, base_policy=args.before, policy=args.after)
    with tempfile.TemporaryDirectory() as tmp:   # 05's answers, exactly; unreadable media are counted there
        skips = common.SkipLog(Path(tmp) / "skipped.jsonl")
        prompts, _, answers = evaluation.policy_answers(cfg, "cpu", skips)
        if skips.total:
            print(skips.summary().split("; see")[0])
    pairs = collections.Counter((r["task"], r["prompt"]) for r in common.read_jsonl(args.pairs)) if args.pairs else {}
    print(table(prompts, answers, pairs))

if __name__ == "__main__":
    main()

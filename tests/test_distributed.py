"""torchrun on CPU (gloo): two ranks of half the batch train the judge like one process of the whole."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import common
from conftest import ROOT, stage

train = stage("02_train_reward")
ARGS = ["--steps", "3", "--batch-size", "8", "--eval-every", "3", "--eval-size", "0", "--warmup", "2"]


def torchrun(script, args, out):
    """Run a stage on two CPU ranks; its output folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args,
           "--out-dir", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def judge_args(toy):
    return ["--data-dir", str(toy / "data"), "--base", str(toy / "base"), *ARGS]


@pytest.fixture(scope="module")
def one_process_judge(toy, tmp_path_factory):
    """02 in one process, the reference both parallel runs are compared with."""
    one = tmp_path_factory.mktemp("one")
    train.main(common.parse_config(train.Config, judge_args(toy) + ["--out-dir", str(one)]))
    return one


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_the_judge_like_one_process(toy, tmp_path, parallel, one_process_judge):
    base, args, one = toy / "base", judge_args(toy), one_process_judge
    two = torchrun("02_train_reward.py", args + ["--parallel", parallel], tmp_path / parallel)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    start = load_file(base / "model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3                                          # training changed the weights
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-2 * moved                                  # ... and both runs changed them alike
    log = lambda out: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log(one)[-1]["loss"] == pytest.approx(log(two)[-1]["loss"], rel=1e-5)
    assert (two / "eval.json").exists() and not (two / "train_state.pt").exists()


def test_two_ranks_align_the_policy_like_one_process(toy, tmp_path):
    """04 under torchrun with FSDP2 (weights sharded over the two ranks): the same weights as one process."""
    rows = common.read_jsonl(toy / "data" / "prompts_train.jsonl")[:10]
    pairs = [{"id": r["id"], "task": r["task"], "media": r["media"], "prompt": r["question"], "chosen": r["answer"],
              "rejected": ", ".join("purple" for _ in r["asked"])} for r in rows]
    common.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    base = toy / "base"
    args = ["--data-dir", str(toy / "data"), "--pairs", str(tmp_path / "pairs.jsonl"), "--policy", str(base),
            "--epochs", "2", "--batch-size", "4", "--warmup", "1", "--lr", "1e-3", "--image-generator", ""]
    dpo = stage("04_dpo")
    one = tmp_path / "one"
    dpo.main(common.parse_config(dpo.Config, args + ["--out-dir", str(one)]))
    two = torchrun("04_dpo.py", args + ["--parallel", "fsdp"], tmp_path / "fsdp")
    a, b, start = (load_file(d / "model.safetensors") for d in (one, two, base))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2 * moved
    log = lambda out: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["heldout"]["loss"] for r in log(one)] == pytest.approx([r["heldout"]["loss"] for r in log(two)], rel=1e-4)


def test_two_ranks_build_the_pairs_of_one_process(toy, tmp_path):
    """03 under torchrun: each rank takes every other chunk; rank 0 merges the ranks' lines into the
    files one process writes, line for line (each chunk is sampled from a seed of its own)."""
    args = ["--data-dir", str(toy / "data"), "--policy", str(toy / "base"), "--reward", str(toy / "base"),
            "--n-samples", "4", "--max-new-tokens", "8", "--chunk", "2"]
    build = stage("03_build_pairs")
    one = tmp_path / "one"
    build.main(common.parse_config(build.Config, args + ["--out-dir", str(one)]))
    two = torchrun("03_build_pairs.py", args, tmp_path / "two")
    for name in ("candidates.jsonl", "pairs.jsonl", "gen_pairs.jsonl"):   # sampled pictures sit in <out>/samples
        a = json.loads(json.dumps(common.read_jsonl(one / name)).replace("/one/samples/", "/two/samples/"))
        b = common.read_jsonl(two / name)
        assert a == b and (a or name == "pairs.jsonl")
    assert len(common.read_jsonl(two / "rank1" / "candidates.jsonl")) > 0   # the second rank did its share
    assert len(common.read_jsonl(one / "candidates.jsonl")) == 12

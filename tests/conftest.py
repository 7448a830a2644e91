"""Shared fixtures: a tiny toy world drawn once per test run in a temp folder, and the shipped tiny
Qwen2.5-VL (toy/base). Everything is sized for seconds on a 2-core CPU: a handful of records per task
and kind (tests check mechanics, not accuracy)."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)   # the tiny model gains little from a second thread; tests check mechanics, not bits


def stage(name):
    """Import a numbered stage script as a module (it does nothing at import time)."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def prep():
    return stage("01_prepare_data")


BASE = ROOT / "toy" / "base"   # the shipped tiny base, as every stage loads it by default


@pytest.fixture(scope="session")
def toy(tmp_path_factory, prep):
    """A small toy world under one folder (data/), beside a link to the shipped base (base/):
    returns the folder."""
    out = tmp_path_factory.mktemp("toy")
    cfg = prep.Config(out_dir=str(out), train_per_group=4, test_per_group=3, policy_train=4, policy_test=4,
                      gen_prompts=2, gen_candidates=4)
    prep.main(cfg)
    (out / "base").symlink_to(BASE)
    return out


@pytest.fixture()
def tiny():
    """A fresh copy of the shipped tiny base model and its processor."""
    import vlm
    return vlm.load_model(BASE), vlm.load_processor(BASE)

"""Shared fixtures: a tiny toy world and a tiny Qwen2.5-VL, built once per test session in a temp folder.

Everything is sized for seconds on a 2-core CPU: a handful of records per task and kind, a base model
pretrained for a few dozen steps only (tests check mechanics, not accuracy)."""
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)   # the same numbers as with 2 threads; the tiny model gains little from more


def stage(name):
    """Import a numbered stage script as a module (it does nothing at import time)."""
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def prep():
    return stage("01_prepare_data")


@pytest.fixture(scope="session")
def toy(tmp_path_factory, prep):
    """A small toy world and a briefly pretrained base model under one folder: returns the folder.
    (60 steps give the visual tokens enough contrast for the overfitting tests; 2 steps do not; 10 steps
    of the second, quality phase run its code.)"""
    out = tmp_path_factory.mktemp("toy")
    cfg = prep.Config(out_dir=str(out), train_per_group=4, test_per_group=3, policy_train=4, policy_test=4,
                      gen_prompts=2, gen_candidates=4, base_steps=60, quality_steps=10, base_batch=8)
    prep.main(cfg)
    return out


@pytest.fixture()
def tiny(toy):
    """A fresh copy of the tiny base model and its processor."""
    import common
    return common.load_model(toy / "base"), common.load_processor(toy / "base")

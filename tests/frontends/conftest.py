"""A small editor model shared by the editor's tests: a seeded random-weight landscape generator
on a 64x128 canvas, compiled once per test session (sessions of every app share it through named
cache slots, as the real server's do)."""
import pytest
import torch

from sigec.frontends.editor.session import EditorModel
from sigec.models.landscape import LandscapeGenerator

HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="session")
def editor_model():
    torch.set_num_threads(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LandscapeGenerator(width=16, blocks=1).eval()
    return EditorModel(model, height=HEIGHT, width=WIDTH, policy="exact", dense_runs=1, report_macs=True)

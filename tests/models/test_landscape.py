"""The landscape generator, its training targets and the shipped weights."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sigec
from sigec.frontends.edits import brush_stroke_mask, wavy_stroke
from sigec.models import WeightsError, available_models, load, read_manifest
from sigec.models.landscape import (CLASSES, LandscapeGenerator, colorize, default_scene, noise_map, one_hot,
                                    random_blobs, random_scene)

pytest.importorskip("skimage")
from sigec.models.landscape_data import KERNEL, render_target, textures  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECEPTIVE_RADIUS = 6          # stem + 2 x 2 block convolutions + head: six 3x3 convolutions


def small_model(seed: int = 0) -> LandscapeGenerator:
    torch.manual_seed(seed)
    return LandscapeGenerator(width=16, blocks=2, hidden=8).eval()


# -- the network ---------------------------------------------------------------------------------

def test_one_pixel_label_change_reaches_only_the_receptive_field():
    model = small_model()
    labels = random_blobs(40, 48, seed=1)
    noise = noise_map(40, 48, seed=1)
    edited = labels.clone()
    edited[20, 24] = (int(labels[20, 24]) + 1) % len(CLASSES)
    with torch.no_grad():
        diff = (model(one_hot(edited), noise) - model(one_hot(labels), noise)).abs().amax(dim=(0, 1))
    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    assert len(ys) > 0
    assert int((ys - 20).abs().max()) <= RECEPTIVE_RADIUS and int((xs - 24).abs().max()) <= RECEPTIVE_RADIUS


@pytest.mark.parametrize("policy", ["exact", "sige"])
def test_engine_matches_the_dense_model_on_a_brush_stroke(policy):
    model = small_model()
    labels, noise = random_scene(64, 128, seed=2), noise_map(64, 128, seed=2)
    points, radius = wavy_stroke(64, 128, 0.03)
    edited = labels.clone()
    edited[brush_stroke_mask(points, radius, 64, 128)] = CLASSES.index("water")
    engine = sigec.compile(model, (one_hot(labels), noise), policy=policy)
    with torch.no_grad():
        engine(one_hot(labels), noise)
        incremental = engine(one_hot(edited), noise)
        dense = model(one_hot(edited), noise)
    if policy == "exact":   # a local network: exact reproduces dense to float rounding
        torch.testing.assert_close(incremental, dense, rtol=0, atol=1e-5)
    else:
        assert 10 * math.log10(4 / F.mse_loss(incremental, dense).item()) > 30


def test_one_hot_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        one_hot(torch.tensor([[0, 8]]))
    with pytest.raises(TypeError, match="integer class indices"):
        one_hot(torch.zeros(2, 2))
    assert one_hot(torch.tensor([[3]])).shape == (1, len(CLASSES), 1, 1)


def test_scenes_are_seeded_and_use_the_landscape_classes():
    a, b = random_scene(64, 128, seed=5), random_scene(64, 128, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, random_scene(64, 128, seed=6))
    present = {CLASSES[i] for i in a.unique().tolist()}
    assert {"sky", "grass"} <= present
    assert colorize(default_scene(32, 64)).shape == (32, 64, 3)


# -- training targets ------------------------------------------------------------------------------

def test_targets_are_local_textures_of_the_painted_class():
    bank = textures()
    labels = torch.full((48, 48), CLASSES.index("grass"))
    labels[:, 24:] = CLASSES.index("sky")
    noise = noise_map(48, 48, seed=3)
    target = render_target(one_hot(labels), noise, bank)
    grass, sky = target[0, :, 8:40, 4:20], target[0, :, 8:40, 28:44]
    # each side has its class's mean colour and a real texture (not a flat colour)
    assert grass[1].mean() > grass[2].mean() and sky[2].mean() > sky[0].mean()
    assert grass.std(dim=(1, 2)).min() > 0.02
    # a changed label changes the target only where the label changed
    edited = labels.clone()
    edited[10:14, 10:14] = CLASSES.index("water")
    changed = (render_target(one_hot(edited), noise, bank) != target).any(dim=1)[0]
    assert changed[10:14, 10:14].all() and changed.sum() == 16
    # a changed noise pixel reaches only the kernel's footprint
    bumped = noise.clone()
    bumped[0, 0, 24, 24] += 1
    ys, xs = torch.nonzero((render_target(one_hot(labels), bumped, bank) != target).any(dim=1)[0], as_tuple=True)
    assert int((ys - 24).abs().max()) <= KERNEL // 2 and int((xs - 24).abs().max()) <= KERNEL // 2


def test_texture_bank_is_deterministic():
    a, b = textures(), textures()
    assert torch.equal(a.kernels, b.kernels) and torch.equal(a.means, b.means)
    assert a.kernels.shape == (len(CLASSES), 3, KERNEL, KERNEL)


# -- brush strokes ----------------------------------------------------------------------------------

def test_brush_stroke_mask_geometry():
    disc = brush_stroke_mask([(50.0, 50.0)], 10.0, 100, 100)
    assert abs(int(disc.sum()) - math.pi * 100) < 20
    line = brush_stroke_mask([(10.0, 50.0), (90.0, 50.0)], 5.0, 100, 100)
    assert line[50, 10:91].all() and not line[40].any() and not line[60].any()
    clipped = brush_stroke_mask([(-3.0, -3.0), (2.0, 2.0)], 3.0, 10, 10)
    assert clipped[0, 0] and not clipped[9, 9]
    assert not brush_stroke_mask([(-50.0, -50.0)], 3.0, 10, 10).any()
    with pytest.raises(ValueError, match="radius"):
        brush_stroke_mask([(1.0, 1.0)], 0.0, 10, 10)
    points, radius = wavy_stroke(128, 256, 0.02)
    assert abs(float(brush_stroke_mask(points, radius, 128, 256).float().mean()) - 0.02) < 0.002


# -- the shipped weights ----------------------------------------------------------------------------

shipped = pytest.mark.skipif("landscape" not in available_models(), reason="no shipped landscape weights")


@shipped
def test_shipped_landscape_is_small_checksummed_and_textured():
    manifest = read_manifest("landscape")
    assert manifest["size_bytes"] <= 20 * 2 ** 20 and manifest["model_class"] == "LandscapeGenerator"
    model = load("landscape").model
    assert isinstance(model, LandscapeGenerator) and not model.training
    bank = textures()
    labels, noise = random_scene(128, 256, seed=2_000_000), noise_map(128, 256, seed=2_000_000)
    x = one_hot(labels)
    target = render_target(x, noise, bank)
    with torch.no_grad():
        out = model(x, noise)
    flat = render_target(x, torch.zeros_like(noise), bank)

    def psnr(a, b):
        return 10 * math.log10(4 / F.mse_loss(a, b).item())
    # the rendering follows the texture, not only the class colour
    assert psnr(out, target) > psnr(flat, target) + 3


@shipped
def test_a_tampered_landscape_is_refused(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    manifest = read_manifest("landscape")
    source = Path(sigec.models.WEIGHTS_DIR)
    data = bytearray((source / manifest["weights"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / manifest["weights"]).write_bytes(bytes(data))
    (folder / "landscape.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="SHA-256"):
        load("landscape", directory=folder)


# -- the training script ----------------------------------------------------------------------------

def _training_module():
    spec = importlib.util.spec_from_file_location("train_landscape", REPO / "examples" / "train_landscape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_is_seeded_and_writes_a_loadable_model(tmp_path):
    script = REPO / "examples" / "train_landscape.py"
    args = ["--steps", "3", "--batch-size", "2", "--crop", "32", "--pool", "2", "--no-score", "--threads", "1"]
    manifests = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, str(script), *args, "--out-dir", str(tmp_path / name),
                        "--plot", str(tmp_path / f"{name}.png"), "--grid", str(tmp_path / f"{name}-grid.png")],
                       check=True, capture_output=True, timeout=600)
        manifests.append(read_manifest("landscape", tmp_path / name))
    # same seed, same training: to float noise, since oneDNN may sum in another order under load
    assert manifests[0]["final_loss"] == pytest.approx(manifests[1]["final_loss"], rel=1e-4)
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / name / "landscape.safetensors")) for name in ("a", "b"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)   # seeds apart differ by ~0.1
    model = load("landscape", directory=tmp_path / "a").model
    assert isinstance(model, LandscapeGenerator)
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "a-grid.png").stat().st_size > 1000


def test_held_out_maps_are_not_training_maps():
    module = _training_module()
    pool = module.label_pool(4, seed=0)
    for labels, _ in module.held_out():
        assert not any(torch.equal(labels.to(torch.uint8), p) for p in pool)


@pytest.mark.slow
@shipped
def test_training_with_the_default_seed_reproduces_the_shipped_loss():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_landscape.py"), "--check"],
                          capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

"""Engine contract: recording, slots, commit, budgets, batches, keyword inputs and bad input."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sigec
from sigec import CacheBudgetError, CaptureError, EngineError


class TimeNet(nn.Module):
    """A conv net conditioned on a timestep, with a keyword-only style input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t, scale=None):
        h = F.silu(self.c1(x) + self.emb(t.reshape(-1, 1).float())[:, :, None, None])
        out = self.c2(h)
        return {"sample": out * scale if scale is not None else out}


def _edit(x, y0=4, x0=5, size=3):
    out = x.clone()
    out[..., y0:y0 + size, x0:x0 + size] += 1.0
    return out


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TimeNet().eval()
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([3])
    return model, x, t


def test_keyword_inputs_and_dict_outputs(setup):
    model, x, t = setup
    scale = torch.full((1, 1, 1, 1), 2.0)
    engine = sigec.compile(model, (x,), {"t": t, "scale": scale}, policy="exact", block_size=4)
    out0 = engine(x, t=t, scale=scale)
    assert set(out0) == {"sample"}
    torch.testing.assert_close(out0["sample"], model(x, t, scale)["sample"])
    x2 = _edit(x)
    torch.testing.assert_close(engine(x2, t=t, scale=scale)["sample"], model(x2, t, scale)["sample"],
                               rtol=1e-4, atol=1e-5)


def test_slots_are_keyed_by_timestep(setup):
    model, x, t = setup
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4)
    engine(x, t)
    engine(x, torch.tensor([7]))
    assert len(engine.store) == 2
    x2 = _edit(x)
    for step in (3, 7):
        ts = torch.tensor([step])
        torch.testing.assert_close(engine(x2, ts)["sample"], model(x2, ts)["sample"], rtol=1e-4, atol=1e-5)


def test_zero_dim_timestep(setup):
    model, x, _ = setup
    t = torch.tensor(3)  # diffusers pipelines pass 0-dim timesteps
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4)
    engine(x, t)
    x2 = _edit(x)
    torch.testing.assert_close(engine(x2, t)["sample"], model(x2, t)["sample"], rtol=1e-4, atol=1e-5)


def test_named_slots(setup):
    model, x, t = setup
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4)
    with engine.slot("original"):
        y0 = engine(x, t)["sample"]
        assert torch.equal(engine(x, t)["sample"], y0)
        with pytest.raises(EngineError, match="different non-spatial inputs"):
            engine(x, torch.tensor([9]))
    assert engine.store.keys() == [("named", "original")]


def test_commit_makes_the_edit_the_baseline(setup):
    model, x, t = setup
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4)
    engine(x, t)
    x1 = _edit(x, 2, 2)
    engine(x1, t)
    engine.commit()
    x2 = _edit(x1, 10, 10)
    out = engine(x2, t)["sample"]
    torch.testing.assert_close(out, model(x2, t)["sample"], rtol=1e-4, atol=1e-5)
    # the second edit was compared with the committed state: only its own region is active
    assert not engine.last_stats["input_mask"][2:5, 2:5].any()
    assert engine.last_stats["input_mask"][10:13, 10:13].all()
    assert torch.equal(engine(x1, t)["sample"], engine(x1, t)["sample"])
    with pytest.raises(EngineError, match="nothing to commit"):
        engine(x1, t)
        engine.commit()


def test_errors_for_basic_misuse(setup):
    model, x, t = setup
    engine = sigec.compile(model, (x, t), block_size=4)
    with pytest.raises(EngineError, match="no recorded run"):
        engine(x, t, mask=torch.ones(16, 16, dtype=torch.bool))
    engine(x, t)
    with pytest.raises(EngineError, match="mask has shape"):
        engine(x, t, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(EngineError, match="dtype torch.bool"):
        engine(x, t, mask=torch.ones(16, 16))
    with pytest.raises(EngineError, match="compiled for"):
        engine(torch.randn(1, 3, 32, 32), t)
    with pytest.raises(EngineError, match="compiled for"):
        engine(x.double(), t)
    # nothing was corrupted: the recorded output still comes back for the original input
    assert torch.equal(engine(x, t)["sample"], model(x, t)["sample"])


def test_cache_budget(setup):
    model, x, t = setup
    engine = sigec.compile(model, (x, t), block_size=4, cache_budget_bytes=1, on_cache_full="raise")
    with pytest.raises(CacheBudgetError, match="more than the budget"):
        engine(x, t)
    engine = sigec.compile(model, (x, t), block_size=4)
    engine(x, t)
    one_slot = engine.store.nbytes()
    evicting = sigec.compile(model, (x, t), block_size=4, cache_budget_bytes=int(one_slot * 1.5))
    evicting(x, torch.tensor([1]))
    evicting(x, torch.tensor([2]))
    assert len(evicting.store) == 1  # the older slot was evicted
    raising = sigec.compile(model, (x, t), block_size=4, cache_budget_bytes=int(one_slot * 1.5),
                            on_cache_full="raise")
    raising(x, torch.tensor([1]))
    with pytest.raises(CacheBudgetError, match="exceed the cache budget"):
        raising(x, torch.tensor([2]))


def test_batch_with_shared_mask_is_exact(setup):
    model, _, _ = setup
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([1, 2, 3])
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4, expected_active_fraction=0.05)
    engine(x, t)
    x2 = x.clone()
    x2[1, :, 3:6, 3:6] += 1  # one sample edited; the mask is shared by the batch
    torch.testing.assert_close(engine(x2, t)["sample"], model(x2, t)["sample"], rtol=1e-4, atol=1e-5)


def test_capture_error_names_the_construct():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python branch on a tensor value
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        sigec.compile(DataDependent().eval(), (torch.randn(1, 1, 4, 4),))
    msg = str(info.value)
    assert "test_engine.py" in msg and "if x.sum() > 0" in msg and "torch.cond" in msg


def test_model_keyword_named_mask_is_refused():
    class Masked(nn.Module):
        def forward(self, x, mask):
            return x * mask

    with pytest.raises(ValueError, match="engine's own edit-mask"):
        sigec.compile(Masked().eval(), (torch.randn(1, 1, 4, 4),), {"mask": torch.ones(1, 1, 4, 4)})


def test_settings_are_validated():
    with pytest.raises(ValueError, match="policy"):
        sigec.compile(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 4, 4),), policy="fast")
    with pytest.raises(ValueError, match="block_size"):
        sigec.compile(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 4, 4),), block_size=0)


def test_scatters_write_the_cache_in_place_and_undo_uncommitted_edits(setup):
    """Working buffers: an edit overwrites its blocks of the cached tensors (no full copies), the
    next edit is still compared with the recording, and returned outputs never change later."""
    model, x, t = setup
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4)
    assert engine.signature.inplace
    engine(x, t)
    slot = engine.store.get(engine.store.keys()[0])
    recorded = [c.clone() for c in slot.caches]
    pointers = [c.data_ptr() for c in slot.caches]
    xa, xb = _edit(x, 1, 1), _edit(x, 10, 9)
    ya = engine(xa, t)["sample"]
    assert [c.data_ptr() for c in slot.caches] == pointers
    assert any(not torch.equal(c, r) for c, r in zip(slot.caches, recorded))  # blocks were written
    ya_kept = ya.clone()
    yb = engine(xb, t)["sample"]  # the first edit was not committed: it is undone first
    torch.testing.assert_close(yb, model(xb, t)["sample"], rtol=1e-4, atol=1e-5)
    assert torch.equal(ya, ya_kept)
    engine(x, t)  # unedited: restores the recording
    for c, r in zip(slot.caches, recorded):
        assert torch.equal(c, r)
    engine(xa, t)
    engine.commit()
    both = _edit(xa, 10, 9)
    torch.testing.assert_close(engine(both, t)["sample"], model(both, t)["sample"], rtol=1e-4, atol=1e-5)


def test_working_buffers_follow_a_sequence_of_uncommitted_edits(monkeypatch):
    """Edits that repeat, grow, move and switch plans: each equals the dense model (exact), a
    repeated edit reads no baseline again, and an unedited call leaves the recording intact."""
    import sigec.core.engine as engine_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                          nn.Upsample(scale_factor=2.0), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(2, 3, 32, 32)  # batch 2: saved blocks are block-major rows
    engine = sigec.compile(model, (x,), policy="exact", block_size=4, expected_active_fraction=(0.01, 0.6))
    engine(x)
    slot = engine.store.get(engine.store.keys()[0])
    recorded = [c.clone() for c in slot.caches]
    reads = []
    original_read = engine_module._read_blocks
    monkeypatch.setattr(engine_module, "_read_blocks", lambda *a: reads.append(a[1].shape[0]) or original_read(*a))
    edits = {"a": _edit(x, 4, 4, 3), "grown": _edit(x, 4, 4, 6), "moved": _edit(x, 20, 18, 3),
             "large": _edit(x, 2, 2, 26)}
    previous = None
    for name in ["a", "a", "grown", "a", "moved", "large", "a", "moved"]:
        reads.clear()
        torch.testing.assert_close(engine(edits[name]), model(edits[name]), rtol=1e-4, atol=1e-5)
        if name == "a" and previous == "a":
            assert reads == []  # the same blocks: their baselines are kept, not read again
        previous = name
    engine(x)
    for c, r in zip(slot.caches, recorded):
        assert torch.equal(c, r)


def test_each_edit_runs_the_plan_made_for_its_area():
    """Plans for several edit areas: a small edit runs more of the network sparse than a large one,
    both match the dense model, and the report names the plan."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(),
                          nn.Upsample(scale_factor=4.0), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4, expected_active_fraction=(0.01, 0.6))
    assert [p.planned_fraction for p in engine.plans] == [0.01, 0.6]
    sparse = [sum(n.meta["sigec.decision"].kind.value == "sparse" for n in p.graph_module.graph.nodes)
              for p in engine.plans]
    assert sparse[0] > sparse[1]
    engine(x)
    small, large = _edit(x, 14, 14, 2), _edit(x, 2, 2, 26)
    for edited, plan in ((small, engine.plans[0]), (large, engine.plans[1])):
        torch.testing.assert_close(engine(edited), model(edited), rtol=1e-4, atol=1e-5)
        assert engine.incremental is plan.incremental
        assert f"made for a {plan.planned_fraction:.1%} edit" in str(engine.report())


def test_a_commit_by_one_plan_keeps_the_others_from_reading_stale_caches():
    """A node dense in the large-edit plan does not update its cache; after that plan commits,
    a small edit must not run a plan that scatters into the stale cache (exact: equals dense)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                          nn.Upsample(scale_factor=2.0), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    engine = sigec.compile(model, (x,), policy="exact", block_size=4, expected_active_fraction=(0.01, 0.6))
    small_plan, large_plan = engine.plans
    assert engine._maintained[0] - engine._maintained[1]  # the small plan keeps caches the large one does not
    engine(x)
    large = _edit(x, 2, 2, 26)
    engine(large)
    assert engine.incremental is large_plan.incremental
    engine.commit()
    both = _edit(large, 14, 14, 2)
    torch.testing.assert_close(engine(both), model(both), rtol=1e-4, atol=1e-5)
    assert engine.incremental is large_plan.incremental  # the small plan's caches lag behind
    engine.clear()
    engine(x)
    torch.testing.assert_close(engine(_edit(x, 14, 14, 2)), model(_edit(x, 14, 14, 2)), rtol=1e-4, atol=1e-5)
    assert engine.incremental is small_plan.incremental  # a new recording makes every plan usable


def test_a_repeated_mask_reuses_its_blocks_and_a_changed_mask_does_not(setup):
    model, x, t = setup
    engine = sigec.compile(model, (x, t), policy="exact", block_size=4)
    engine(x, t)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:7, 5:8] = True
    x2 = _edit(x)
    out1 = engine(x2, t, mask=mask.clone())["sample"]
    blocks1 = engine.last_stats["blocks"]
    out2 = engine(x2, t, mask=mask.clone())["sample"]  # equal content, another tensor
    assert engine.last_stats["blocks"] is blocks1 and torch.equal(out1, out2)
    # the caller's mask changes in place: the stats follow its new content, not the memo
    moved = mask.clone()
    engine(x2, t, mask=moved)
    moved.zero_()
    moved[10:13, 10:13] = True
    x3 = _edit(x, 10, 10)
    out3 = engine(x3, t, mask=moved)["sample"]
    fresh = engine.mask_stats(moved, every_node=True)["blocks"]
    assert all(torch.equal(engine.last_stats["blocks"][k], fresh[k]) for k in fresh)
    torch.testing.assert_close(out3, model(x3, t)["sample"], rtol=1e-4, atol=1e-5)
    # and back to the first mask: the memo was replaced, the result is still right
    mask_again = mask.clone()
    engine(x2, t, mask=mask_again)
    mask_again.zero_()  # mutating it after the call cannot reach the engine's memo
    torch.testing.assert_close(engine(x2, t, mask=mask.clone())["sample"], model(x2, t)["sample"], rtol=1e-4, atol=1e-5)

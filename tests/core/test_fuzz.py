"""Random call sequences against one engine (issue: reliability).

After every step the engine's output must equal a fresh reference computation (the reference
interpreter of the same plan, fed the same baseline and mask) or the step must raise a specific
``EngineError``. Under ``exact`` on a local net, difference-driven edits of an uncommitted
explicit-mask-free history must also equal the dense model. ``SIGEC_FUZZ_EXAMPLES`` sets the
number of sequences (default 25).
"""
import os
import re

import torch
import torch.nn as nn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import sigec
from sigec import EngineError
from sigec.runtime import ReferenceRuntime

SIZE = 12


class TimeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.emb = nn.Linear(1, 6)
        self.conv2 = nn.Conv2d(6, 3, 3, stride=1, padding=2, dilation=2)

    def forward(self, x, t):
        h = torch.relu(self.conv1(x) + self.emb(t[:, None].float())[:, :, None, None])
        return self.conv2(h) + x


class EngineMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 1000))
    def setup(self, seed):
        torch.manual_seed(seed)
        self.model = TimeConv().eval()
        self.x = torch.randn(1, 3, SIZE, SIZE)
        self.t = 1
        self.engine = sigec.compile(self.model, (self.x, torch.tensor([self.t])), policy="exact", block_size=3)
        self.slots: dict = {}  # timestep -> (reference, baseline input, exact-so-far)
        self.pending = None

    # -- the oracle ---------------------------------------------------------------------------
    def _call(self, x, t, mask=None):
        ts = torch.tensor([t])
        if t not in self.slots:
            if mask is not None:
                self._expect_error(lambda: self.engine(x, ts, mask=mask), "no recorded run")
                return
            out = self.engine(x, ts)
            reference = ReferenceRuntime(self.engine.graph_module)
            torch.testing.assert_close(out, reference.record([x, ts])[0], rtol=0, atol=0)
            self.slots[t] = [reference, x.clone(), True, out]
            self.pending = None
        else:
            reference, baseline, exact, baseline_out = self.slots[t]
            used = mask if mask is not None else ~((x - baseline).abs() <= 1e-6).reshape(-1, SIZE, SIZE).all(0)
            out = self.engine(x, ts, mask=mask) if mask is not None else self.engine(x, ts)
            if not used.any():
                assert torch.equal(out, baseline_out)  # nothing edited: the baseline, bit for bit
                self.pending = None
            else:
                torch.testing.assert_close(out, reference.run([x, ts], used, self.engine.graph_module)[0], rtol=1e-4, atol=1e-4)
                self.pending = (t, x.clone(), mask is None, out)
            if exact and mask is None:
                torch.testing.assert_close(out, self.model(x, ts), rtol=1e-4, atol=1e-4)
        self.x, self.t = x, t

    def _expect_error(self, fn, pattern):
        try:
            fn()
        except EngineError as exc:
            assert re.search(pattern, str(exc)), str(exc)
        else:
            raise AssertionError(f"expected an EngineError matching {pattern!r}")

    # -- steps ----------------------------------------------------------------------------------
    @rule(y=st.integers(0, SIZE - 1), x0=st.integers(0, SIZE - 1), size=st.integers(1, 5),
          value=st.floats(-2, 2, allow_nan=False))
    def edit(self, y, x0, size, value):
        x = self.x.clone()
        x[..., y:y + size, x0:x0 + size] += value
        self._call(x, self.t)

    @rule(y=st.integers(0, SIZE - 1), x0=st.integers(0, SIZE - 1))
    def edit_with_explicit_mask(self, y, x0):
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        mask[y:y + 3, x0:x0 + 3] = True
        self._call(torch.where(mask, self.x + 1.0, self.x), self.t, mask)

    @rule()
    def commit(self):
        if self.pending is None:
            self._expect_error(self.engine.commit, "nothing to commit")  # also after a weight change
            return
        self.engine.commit()
        t, x, by_difference, out = self.pending
        self.slots[t][0].commit()
        self.slots[t][1] = x
        self.slots[t][2] = self.slots[t][2] and by_difference
        self.slots[t][3] = out
        self.pending = None

    @rule(step=st.integers(0, 3))
    def switch_slot(self, step):
        self._call(self.x, step)

    @rule(scale=st.floats(0.5, 1.5))
    def change_weights_in_place(self, scale):
        with torch.no_grad():
            self.model.conv1.weight.mul_(scale)
        self.slots.clear()  # every slot is stale: the engine records again on the next call
        self.pending = None

    @rule(shape=st.sampled_from([(SIZE - 1, SIZE), (1, SIZE, SIZE)]))
    def bad_mask_shape(self, shape):
        self._expect_error(lambda: self.engine(self.x, torch.tensor([self.t]), mask=torch.ones(shape, dtype=torch.bool)),
                           "mask has shape|no recorded run")

    @rule()
    def bad_mask_dtype(self):
        self._expect_error(lambda: self.engine(self.x, torch.tensor([self.t]), mask=torch.ones(SIZE, SIZE)),
                           "dtype torch.bool|no recorded run")

    @rule()
    def wrong_input_dtype(self):
        self._expect_error(lambda: self.engine(self.x.half(), torch.tensor([self.t])), "compiled for")

    @rule(dtype=st.sampled_from([torch.float64, torch.float16]))
    def change_dtype(self, dtype):
        # graphs are specialized to their dtype: moving is refused, and nothing changes
        self._expect_error(lambda: self.engine.to(dtype), "cannot move from")


EngineMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SIGEC_FUZZ_EXAMPLES", "25")), stateful_step_count=12, deadline=None,
    suppress_health_check=list(HealthCheck))
TestEngineFuzz = EngineMachine.TestCase

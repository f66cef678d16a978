"""A particle-filter step leaves no reference cycles behind (DESIGN §8, steady step latency).

Garbage that only the cyclic collector frees sets off collections in the middle of a long
filter (a recursive closure per trace read did, and torch's pytree walk makes one per call):
here, a few steps of the wrapped model (extend, weigh, resample, an MH move on the newest
state, read the choices and the return value), run with the collector off and
``DEBUG_SAVEALL``, must leave ``gc.garbage`` empty.
"""

from __future__ import annotations

import gc

import torch

# the wrapped linear-Gaussian model of the model-shape tests
from test_pf_shapes import wrapped as model  # noqa: E402

import gfcomb as gf
from gfcomb.inference import mh, pf_initialize, pf_rejuvenate, pf_resample, pf_update


def test_filter_steps_make_no_cyclic_garbage():
    torch.manual_seed(0)
    ys = torch.randn(12)
    state = pf_initialize(model, (0,), None, 50)
    for t in range(4):  # (warm caches first)
        state = pf_update(state, (t + 1,), (gf.UnknownChange(),), {("steps", t, "y"): ys[t]})
        state = pf_resample(state)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for t in range(4, 12):
            state = pf_update(state, (t + 1,), (gf.UnknownChange(),),
                              {("steps", t, "y"): ys[t]})
            state = pf_resample(state)
            state = pf_rejuvenate(state, mh, gf.select(("steps", t, "x")))
            _ = state.traces.choices  # reading the choices and the states: no cycle either
            _ = state.traces.retval
        gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert garbage == []

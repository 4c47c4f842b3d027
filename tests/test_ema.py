import copy

import pytest
import torch
from torch import nn

from dit.utils.ema import EMA, ema_decay_at


def test_decay_schedule_formula():
    assert ema_decay_at(0.9999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.9999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999  # capped by the configured decay
    assert ema_decay_at(0.999, 0, warmup=False) == 0.999


def test_ema_update_is_lerp_and_warmup_tracks_the_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    init = copy.deepcopy(model.state_dict())
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the model moves away from its initial weights
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    for k in range(200):
        d = ema_decay_at(0.999, k)
        ema.update(model, decay=d)
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
    for name in expected:
        torch.testing.assert_close(ema.state_dict()[name], expected[name])
    # With warm-up the average has essentially reached the model (the initial weights' share is prod(d_k) ~ 5%) ...
    share_init = (ema.state_dict()["weight"] - model.weight).abs().max().item()
    assert share_init < 0.1
    # ... whereas a fixed 0.999 would still hold 0.999 ** 200 = 82% of the initial weights.
    fixed = EMA(nn.Linear(4, 3), decay=0.999)
    fixed.module.load_state_dict(init)
    for _ in range(200):
        fixed.update(model)
    assert (fixed.state_dict()["weight"] - model.weight).abs().max().item() > 0.8

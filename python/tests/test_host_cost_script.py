"""scripts/host-cost.py's --drain: the waits it makes (untimed, every N calls) are for the group's
device, which is what fills the launch queue; the current device, which the script never sets,
may be another GPU, idle, whose wait drains nothing (and then reads ~0, as for a host-bound run)."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("host_cost", ROOT / "scripts" / "host-cost.py")
host_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_cost)


def test_drain_waits_for_the_groups_device_every_n_calls(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    drain = host_cost.Drain("cuda:1", 3)
    for i in range(7):
        drain(i)
    assert waited == ["cuda:1"] * 3   # (calls 0, 3 and 6)
    assert "every 3" in drain.note(7)
    off = host_cost.Drain("cpu", 3)
    for i in range(7):
        off(i)
    assert waited == ["cuda:1"] * 3 and off.note(7) == ""

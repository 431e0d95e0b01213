"""The planner: which node holds which layers, chosen to be fast, explained, and pure (no torch, no I/O).

``plan(model, devices, options) -> Plan`` raises ``PlanError`` with the numbers. Model profiles come from
presets, HF ``config.json`` or GGUF headers (``loaders``, the only I/O here). Nodes sharing one machine have its
memory and cores shared out first (``hosts.share_hosts``). The cost-model defaults per
device kind are documented in ``profiles``; the memory and time model in ``cost``; the search in ``split``.
"""

from coordinator.planner.cost import Objective, PlanOptions, Stage
from coordinator.planner.explain import PlanError
from coordinator.planner.hosts import HostShare, share_hosts
from coordinator.planner.profiles import PRESETS, DeviceKind, DeviceProfile, Memory, ModelProfile, preset
from coordinator.planner.split import LeftOut, Plan, plan
from coordinator.planner.weights import WeightFormat, weight_table

__all__ = [
    "PRESETS",
    "DeviceKind",
    "DeviceProfile",
    "HostShare",
    "LeftOut",
    "Memory",
    "ModelProfile",
    "Objective",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Stage",
    "WeightFormat",
    "plan",
    "preset",
    "share_hosts",
    "weight_table",
]

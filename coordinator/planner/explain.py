"""``PlanError``: what does not fit, by how much, and what would make it fit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from coordinator.planner.cost import CostModel, PlanOptions
from coordinator.planner.profiles import DeviceProfile, Memory, ModelProfile
from coordinator.planner.weights import FORMATS_BY_SIZE, weight_table


class PlanError(ValueError):
    """No placement fits.

    ``shortfall_bytes`` is how much more memory the devices would need in total (0 when the total suffices but
    no contiguous split does); ``suggestions`` are sentences saying what would fit.
    """

    def __init__(
        self,
        message: str,
        shortfall_bytes: int,
        needed_bytes: int,
        available_bytes: int,
        suggestions: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.suggestions = tuple(suggestions)

    @property
    def message(self) -> str:
        return str(self.args[0])


def _fits(model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions) -> bool:
    return bool(devices) and CostModel(model, devices, options).feasible()


def diagnose(model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions) -> PlanError:
    """Build the error for a case that does not fit, with the numbers and the ways out."""
    cm = CostModel(model, devices, options)
    t = cm.table
    weights = t.total_bytes
    kv = round(cm.kv_layer * cm.L)
    fixed = min((d.reserve.bytes + cm.ws_base for d in devices), default=0)
    needed = weights + kv + fixed + cm.ws_head
    available = sum(max(0, d.memory.bytes - d.reserve.bytes - round(cm.ws_base)) for d in devices) + fixed
    shortfall = max(0, needed - available)
    head = (
        f"{model.name} at {t.label} with {options.context} tokens x {options.batch} sequences does not fit: "
        f"it needs {Memory(needed)} (weights {Memory(weights)}, KV cache {Memory(kv)}, workspace, reserve) "
        f"but the {len(devices)} device(s) offer {Memory(available)}"
    )
    if shortfall:
        head += f", short by {Memory(shortfall)}"
    else:
        head += "; no contiguous split fits (a stage is too big)"
    tips: list[str] = []
    # more memory: the smallest extra device (of the largest device's kind) that makes it fit
    kind = max(devices, key=lambda d: d.memory.bytes).kind if devices else "cpu"
    lo, hi = 0, max(needed, 10**9) * 2
    if _fits(model, [*devices, DeviceProfile.declare("extra", Memory(hi), kind)], options):
        for _ in range(40):
            mid = (lo + hi) // 2
            extra = DeviceProfile.declare("extra", Memory(mid), kind)
            lo, hi = (lo, mid) if _fits(model, [*devices, extra], options) else (mid, hi)
            if hi - lo < 10**7:
                break
        tips.append(f"more memory: add a {kind} device with at least {Memory(hi)} usable")
    # a smaller weight format
    if options.weights is not None:
        current = weight_table(model, options.weights).total_bytes
        for fmt in FORMATS_BY_SIZE:
            size = weight_table(model, fmt).total_bytes
            if size < current and _fits(model, devices, replace(options, weights=fmt)):
                tips.append(f"a smaller weight format: {fmt.value} fits (weights {Memory(size)})")
                break
    # a shorter context
    if options.context > 1 and _fits(model, devices, replace(options, context=1)):
        lo_c, hi_c = 1, options.context
        while hi_c - lo_c > 1:
            mid_c = (lo_c + hi_c) // 2
            ok = _fits(model, devices, replace(options, context=mid_c))
            lo_c, hi_c = (mid_c, hi_c) if ok else (lo_c, mid_c)
        tips.append(f"a shorter context: up to {lo_c} tokens fits")
    if options.batch > 1 and _fits(model, devices, replace(options, batch=1)):
        tips.append("fewer sequences: --batch 1 fits")
    if not tips:
        tips.append("nothing smaller fits these devices; add machines")
    return PlanError(head, shortfall, needed, available, tips)

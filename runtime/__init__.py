"""sigec runtime: sparse custom ops, masks, cache slots and the reference interpreter."""
from sigec.runtime import ops  # noqa: F401  (registers torch.ops.sigec.*)
from sigec.runtime import attention  # noqa: F401  (registers torch.ops.sigec.attention*)
from sigec.runtime import token_ops  # noqa: F401  (registers torch.ops.sigec.token_*)
from sigec.runtime.cache import CacheBudgetError, Slot, SlotStore
from sigec.runtime.reference import ReferenceRuntime

__all__ = ["ops", "CacheBudgetError", "Slot", "SlotStore", "ReferenceRuntime"]

"""``sigec.costs``: the public name of the kernel cost model, which lives in ``sigec.ir.costs``
(the passes read it, so it sits below them). One module under two names, not a copy."""
import sys

from sigec.ir import costs as _costs

sys.modules[__name__] = _costs

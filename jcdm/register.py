"""Import every module that defines gin configurables, so files and bindings can name them."""

import jcdm.data  # noqa: F401
import jcdm.models  # noqa: F401
import jcdm.runtime.checkpoint  # noqa: F401
import jcdm.runtime.compile_cache  # noqa: F401
import jcdm.runtime.distributed  # noqa: F401
import jcdm.runtime.lease  # noqa: F401
import jcdm.runtime.mesh  # noqa: F401
import jcdm.runtime.reporting  # noqa: F401
import jcdm.runtime.stall  # noqa: F401
import jcdm.training.inference  # noqa: F401
import jcdm.training.train  # noqa: F401

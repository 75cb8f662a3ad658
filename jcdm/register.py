"""Import every module that defines gin configurables, so files and bindings can name them."""

import jcdm.checkpoint  # noqa: F401
import jcdm.data  # noqa: F401
import jcdm.distributed  # noqa: F401
import jcdm.inference  # noqa: F401
import jcdm.mesh  # noqa: F401
import jcdm.models  # noqa: F401
import jcdm.reporting  # noqa: F401
import jcdm.train  # noqa: F401

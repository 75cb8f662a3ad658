"""Types shared by every part of the data package: the image spec and the validation error."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """Bad dataset input: the message names the file or setting at fault and how to fix it.

    Raised while opening a dataset, i.e. before training starts, so launchers can treat it as a
    usage error (`jcdm.exit_codes.USAGE`) rather than retrying.
    """


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Shape of the images one dataset yields, and how many records it holds.

    Attributes:
      height: image height in pixels.
      width: image width in pixels.
      channels: 1 (grey) or 3 (RGB).
      num_records: records in one epoch of the dataset.
    """

    height: int
    width: int
    channels: int
    num_records: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The `(height, width, channels)` shape of one image."""
        return (self.height, self.width, self.channels)

    @property
    def image_bytes(self) -> int:
        """Bytes of one uint8 image."""
        return self.height * self.width * self.channels

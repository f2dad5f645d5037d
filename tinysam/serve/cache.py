"""Image embeddings kept between clicks: an LRU bounded by bytes, shared by all browser tabs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class CachedImage:
    """What a click needs to decode without the encoder: the predictor's image state."""

    image: np.ndarray  # HxWx3 uint8, for the everything mode and overlays
    state: dict[str, Any]  # features, original_size, input_size
    nbytes: int


def _nbytes(value) -> int:
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if hasattr(value, "element_size"):  # torch tensor
        return int(value.element_size() * value.nelement())
    return 0


def capture(predictor, image: np.ndarray) -> CachedImage:
    """The state ``predictor.set_image(image)`` left (call it first)."""
    state = {
        "features": predictor.features,
        "original_size": predictor.original_size,
        "input_size": predictor.input_size,
    }
    return CachedImage(image, state, image.nbytes + _nbytes(predictor.features))


def restore(predictor, cached: CachedImage) -> None:
    """Make ``cached`` the predictor's current image, as if ``set_image`` had just run."""
    predictor.reset_image()  # drops per-image helpers (e.g. the many-prompt decoder)
    for name, value in cached.state.items():
        setattr(predictor, name, value)
    predictor.is_image_set = True


class EmbeddingCache:
    """Least recently used first out, once the cached images exceed ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedImage] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, item: CachedImage) -> None:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = item
            while len(self._items) > 1 and self.nbytes > self.max_bytes:
                self._items.popitem(last=False)

    def get(self, key: str) -> CachedImage | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

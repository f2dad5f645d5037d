"""Image embeddings kept between clicks: an LRU bounded by bytes, shared by all browser tabs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..predictor_base import ImageState, PredictorBase


@dataclass
class CachedImage:
    """What a click needs to decode without the encoder: the predictor's image state."""

    image: np.ndarray  # HxWx3 uint8, for the everything mode and overlays
    state: ImageState
    nbytes: int


def capture(predictor: PredictorBase, image: np.ndarray) -> CachedImage:
    """The state ``predictor.set_image(image)`` left (call it first)."""
    state = predictor.image_state()
    return CachedImage(image, state, image.nbytes + state.nbytes)


def restore(predictor: PredictorBase, cached: CachedImage) -> None:
    """Make ``cached`` the predictor's current image, as if ``set_image`` had just run."""
    predictor.restore_image_state(cached.state)


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

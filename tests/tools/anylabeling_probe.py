"""Run inside an environment with X-AnyLabeling installed (``x-anylabeling-cvhub``): load a
model config through its own loading code for Segment Anything models and segment one click.

    python anylabeling_probe.py MODEL.yaml IMAGE X Y OUT.npy

Writes the mask X-AnyLabeling builds its polygon from (``masks > 0`` of the first mask), as
a bool array. Loading follows ``ModelManager.load_custom_model`` (the YAML read with its
loader, ``config_file`` added) and ``SegmentAnything.__init__``; segmenting follows
``SegmentAnything.predict_shapes`` up to ``post_process``.
"""

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import anylabeling.config  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from anylabeling.services.auto_labeling.model import load_model_config  # noqa: E402
from anylabeling.services.auto_labeling.segment_anything import SegmentAnything  # noqa: E402


def main() -> None:
    config_path, image_path, x, y, out = sys.argv[1:6]
    with open(config_path, encoding="utf-8") as f:
        config = load_model_config(f)
    config["config_file"] = os.path.abspath(config_path)
    anylabeling.config.current_config_file = "{}"  # app.py sets the user's rc; none here
    model = SegmentAnything(config, on_message=print)
    rgb = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
    model.set_auto_labeling_marks([{"type": "point", "data": [int(x), int(y)], "label": 1}])
    embedding = model.model.encode(rgb)
    masks = model.model.predict_masks(embedding, model.marks)
    mask = masks[0][0] if masks.ndim == 4 else masks[0]
    np.save(out, mask > 0.0)


if __name__ == "__main__":
    main()

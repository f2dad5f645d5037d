"""The paper's evaluation protocols: box-prompted instance AP (COCO, LVIS), point-prompt mIoU
against clicks, dense vs hierarchical everything mode, and parameters/FLOPs/latency."""

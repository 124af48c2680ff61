"""distpose: distributed top-down 2D human-pose training on COCO keypoints."""

__version__ = "0.1.0"

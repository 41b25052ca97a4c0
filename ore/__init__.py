"""ORE: open-world object detection on torchvision."""

__version__ = "0.1.0"

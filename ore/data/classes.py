"""Class lists and task splits: M-OWODB, S-OWODB, the toy world, or a user's YAML file.

The one source of class names in the project. Label indices follow SPEC §2:
0 = background, 1..K = known classes in task order, K+1 = ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ore.errors import OreError
from ore.fileio import read_yaml

UNKNOWN = "unknown"

# COCO names that differ from the VOC names used throughout (SPEC §4).
COCO_TO_VOC = {
    "airplane": "aeroplane",
    "dining table": "diningtable",
    "motorcycle": "motorbike",
    "potted plant": "pottedplant",
    "couch": "sofa",
    "tv": "tvmonitor",
    "tv/monitor": "tvmonitor",  # the spelling of some VOC class lists
}

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

OWOD_TASKS = (
    VOC_CLASSES,
    (
        "truck", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
        "suitcase", "microwave", "oven", "toaster", "sink", "refrigerator",
    ),
    (
        "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
        "skateboard", "surfboard", "tennis racket", "banana", "apple", "sandwich", "orange",
        "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    ),
    (
        "bed", "toilet", "laptop", "mouse", "remote", "keyboard", "cell phone", "book", "clock",
        "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "wine glass", "cup", "fork",
        "knife", "spoon", "bowl",
    ),
)

# S-OWODB (OW-DETR): COCO super-categories grouped into four tasks; names in VOC spelling.
SOWOD_TASKS = (
    (  # animal + person + vehicle
        "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
        "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    ),
    (  # appliance + accessory + outdoor + furniture
        "microwave", "oven", "toaster", "sink", "refrigerator", "backpack", "umbrella",
        "handbag", "tie", "suitcase", "traffic light", "fire hydrant", "stop sign",
        "parking meter", "bench", "chair", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    ),
    (  # sports + food
        "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
        "skateboard", "surfboard", "tennis racket", "banana", "apple", "sandwich", "orange",
        "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    ),
    (  # electronic + indoor + kitchen
        "tvmonitor", "laptop", "mouse", "remote", "keyboard", "cell phone", "book", "clock",
        "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "bottle", "wine glass",
        "cup", "fork", "knife", "spoon", "bowl",
    ),
)

# The toy world (SPEC §7): 4 tasks of 5 shape classes, plus 3 classes never introduced.
TOY_TASKS = (
    ("circle", "square", "triangle", "cross", "star"),
    ("ring", "hexagon", "diamond", "arrow", "heart"),
    ("crescent", "pentagon", "ellipse", "trapezoid", "lshape"),
    ("tshape", "octagon", "semicircle", "parallelogram", "chevron"),
)
TOY_NEVER_INTRODUCED = ("spiral", "hourglass", "bolt")


def canonical_name(name: str) -> str:
    """Normalise a class name from an annotation: trim, lower-case, COCO→VOC alias."""
    name = " ".join(name.strip().lower().split())
    return COCO_TO_VOC.get(name, name)


@dataclass(frozen=True)
class TaskSplit:
    """An ordered list of tasks, each introducing some classes.

    Attributes:
        name: ``owod``, ``sowod``, ``toy`` or the YAML file's path.
        tasks: class names introduced by each task, in order.
        never_introduced: classes that exist in the data but no task ever teaches
            (always unknown). Any other name missing from every task is an error.
    """

    name: str
    tasks: tuple[tuple[str, ...], ...]
    never_introduced: tuple[str, ...] = ()

    def __post_init__(self):
        seen: set[str] = set()
        for t, classes in enumerate(self.tasks, start=1):
            for c in classes:
                if c in seen:
                    raise OreError(f"class split {self.name}: class {c!r} appears twice (task {t})")
                if c == UNKNOWN:
                    raise OreError(f"class split {self.name}: {UNKNOWN!r} is reserved")
                seen.add(c)
        if not self.tasks or any(not t for t in self.tasks):
            raise OreError(f"class split {self.name}: every task needs at least one class")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @cached_property
    def classes(self) -> tuple[str, ...]:
        """Every class of every task, in task order (label i+1 is classes[i])."""
        return tuple(c for task in self.tasks for c in task)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def unknown_label(self) -> int:
        return self.num_classes + 1

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names by label index: background, the classes, unknown."""
        return ("__background__", *self.classes, UNKNOWN)

    def check_task(self, task: int) -> int:
        if not isinstance(task, int) or not 1 <= task <= self.num_tasks:
            raise OreError(f"task {task!r} is not in 1..{self.num_tasks} for split {self.name}")
        return task

    def introduced(self, task: int) -> tuple[str, ...]:
        """Classes first taught in ``task`` (1-based)."""
        return self.tasks[self.check_task(task) - 1]

    def previous(self, task: int) -> tuple[str, ...]:
        """Classes taught before ``task``."""
        return tuple(c for t in self.tasks[: self.check_task(task) - 1] for c in t)

    def seen(self, task: int) -> tuple[str, ...]:
        """Classes known once ``task`` is learnt (previous + introduced)."""
        return tuple(c for t in self.tasks[: self.check_task(task)] for c in t)

    def label(self, name: str) -> int:
        """Label index of a class name (``unknown`` → K+1)."""
        if name == UNKNOWN:
            return self.unknown_label
        try:
            return self._labels[name]
        except KeyError:
            raise OreError(f"class {name!r} is in no task of split {self.name}") from None

    @cached_property
    def _labels(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes, start=1)}

    def is_known_name(self, name: str) -> bool:
        """True for a class of some task or a declared never-introduced class."""
        return name in self._all_names

    @cached_property
    def _all_names(self) -> frozenset[str]:
        return frozenset(self.classes) | frozenset(self.never_introduced)


BUILTIN_SPLITS = {
    "owod": TaskSplit("owod", OWOD_TASKS),
    "sowod": TaskSplit("sowod", SOWOD_TASKS),
    "toy": TaskSplit("toy", TOY_TASKS, TOY_NEVER_INTRODUCED),
}


def parse_task(text: str | int) -> int:
    """``t2`` or ``2`` → 2 (checked against a split by :meth:`TaskSplit.check_task`)."""
    raw = str(text).strip().lower()
    digits = raw[1:] if raw.startswith("t") else raw
    if not digits.isdigit() or int(digits) < 1:
        raise OreError(f"task {text!r}: expected t1, t2, … (or 1, 2, …)")
    return int(digits)


def load_task_split(spec: str | Path) -> TaskSplit:
    """A built-in split by name (``owod``, ``sowod``, ``toy``) or a YAML file.

    The YAML file holds ``tasks: [[class, …], [class, …], …]`` and optionally
    ``never_introduced: [class, …]`` for classes that are always unknown.
    """
    if str(spec) in BUILTIN_SPLITS:
        return BUILTIN_SPLITS[str(spec)]
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        raise OreError(
            f"class split {spec!r}: expected one of {sorted(BUILTIN_SPLITS)} or a .yaml file"
        )
    if not path.is_file():
        raise OreError(f"class split file not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict) or "tasks" not in data:
        raise OreError(f"{path}: expected a mapping with key 'tasks: [[class, ...], ...]'")
    unknown_keys = set(data) - {"tasks", "never_introduced"}
    if unknown_keys:
        raise OreError(f"{path}: unknown key(s) {sorted(unknown_keys)}; expected 'tasks', "
                       "'never_introduced'")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not all(
        isinstance(t, list) and all(isinstance(c, str) for c in t) for t in tasks
    ):
        raise OreError(f"{path}: 'tasks' must be a list of lists of class names")
    never = data.get("never_introduced") or []
    if not isinstance(never, list) or not all(isinstance(c, str) for c in never):
        raise OreError(f"{path}: 'never_introduced' must be a list of class names")
    return TaskSplit(
        str(path),
        tuple(tuple(canonical_name(c) for c in t) for t in tasks),
        tuple(canonical_name(c) for c in never),
    )

"""The main job on the toy world: ORE and the closed-set baseline through every task,
the targets they are held to, the figures, and the report page."""

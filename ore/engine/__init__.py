"""Every run: detector training, the task schedule and exemplar finetune, the energy fit,
inference and detection, the evaluation loop, and backbone pretraining; with what runs
share: checkpoints (the only file reader of weights), the runtime (device, seeds, random
state, learning-rate schedules), the metrics log, the run-folder layout and processes."""

"""Memory: predict the peak GPU memory of a fine-tuning run (`estimate`), pick a setting that fits (`plan`), and the
building blocks that lower it: 8-bit and CPU-offloaded optimizers (`optim`), activation offloading (`offload`)."""
from slimtune.memory.estimate import METHODS, OPTIMIZERS, PRECISIONS, estimate  # noqa: F401

"""Memory: predict the peak GPU memory of a fine-tuning run (`estimate`, from the parameter table of `params` and the
saved-activation rules of `activations`) and pick a setting that fits (`plan`). The runtime pieces that lower memory
live where they run: optimizers in `slimtune.optim`, activation offload in `slimtune.train.offload`."""

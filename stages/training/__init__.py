"""Training helpers of the stages (not stages themselves): the optimisation fields and schedule, the
denoiser's Lightning module and fit loop, checkpoints with checksums, the non-finite guard, the world
size, and distributed training through Ray Train (the only stage code that imports Ray)."""

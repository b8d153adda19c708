"""Planning: what a recipe will need before it runs (parameters, memory per device, weight traffic,
training step time, the fewest GPUs, disk), computed without weights on meta-device models.

`memory` and `training` are arithmetic on `twotower.sizing`'s counts; `estimate` reads a recipe's
sections through the stages' typed configs and assembles the plan that `python -m pipeline plan`
prints; `estimate_cache` keeps the two figures `validate` needs per backbone. The runtime
(`twotower/`) keeps only the parameter counting an export reports.
"""

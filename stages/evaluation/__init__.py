"""Evaluation helpers of the stages (not stages themselves): decoding every mode side by side,
batch sweeps, confidence intervals, the mode table and its plots, HumanEval in a sandbox and the
lm-eval model wrapper."""

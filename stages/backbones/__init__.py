"""Backbone helpers of the stages (not stages themselves): where a backbone comes from (hub, local
directory, GGUF file, random init), its shape per family, loading two-tower checkpoints and placing
them on devices."""

"""Data helpers of the stages (not stages themselves): sources, tokenizers, the synthetic task
families, token shards on disk and the block-aligned rows and samplers training reads them through."""

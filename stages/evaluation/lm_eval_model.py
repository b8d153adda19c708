"""`twotower` as an lm-evaluation-harness model: score an export with the field's own tasks.

    twotower-lm-eval --model twotower --model_args pretrained=EXPORT_DIR,mode=diffusion,gamma=0.8 \\
        --tasks hellaswag --batch_size 8

`twotower-lm-eval` (also `python -m stages.evaluation.lm_eval_model`) is lm-eval's own command line, run after
importing this module, which registers the model under the name `twotower`. The plain `lm_eval`
command cannot be used for it: lm-eval 0.4.x (0.4.13 is the newest release) finds models only in
its own source tree (the `MODEL_MAPPING` dict of `lm_eval/models/__init__.py`, registered by its
`_register_all_models()`), with no plugin entry point and no option to import a module first (see
docs/stages.md, "lm-evaluation-harness"); the wrapper is the way its maintainers suggest
(EleutherAI/lm-evaluation-harness#1621).
In Python, `import stages.evaluation.lm_eval_model` and then `lm_eval.simple_evaluate(model="twotower", ...)`.

What each request type runs:
- `loglikelihood` and `loglikelihood_rolling`: the context tower alone, i.e. the frozen backbone,
  exactly as lm-eval's `hf` model scores that backbone (same tokenization, same BOS-or-EOS prefix
  for an empty context, same rolling windows), batched with right padding;
- `generate_until`: `model.generate` in the chosen `mode` (any of `twotower.generate.MODES`:
  `diffusion` at `gamma`, `verified`, `auto`, `mock_ar`, `ar`), greedy, batched, stopping at the
  request's `until` strings (and EOS) and at `max_gen_toks` (`stages.evaluation.text_generation`).
`mode`, `gamma` and `block_size` default to the export's `generation_config.json`; lm-eval's results
record them with the export path (`get_model_info`). `--model hf --model_args pretrained=EXPORT` in
this command fails with an error naming `--model twotower` (`twotower.hf_config.NotACausalLM`).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

# lm-eval's own models first: `lm_eval.api.registry.get_model` imports `lm_eval.models` (which
# registers `hf`, `vllm`, ... as lazy placeholders) only while the registry is *empty*, so
# registering `twotower` alone would hide every built-in model from this process.
import lm_eval.models  # noqa: F401

# lm-evaluation-harness is the optional `eval` extra: the `lm_eval` stage checks for it (with the
# install hint) before it imports this module; imported alone without it, this fails on `lm_eval`.
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

# `model_type: twotower` known to transformers, so `--model hf --model_args pretrained=EXPORT` in this
# command fails with an error naming `--model twotower` (`twotower.hf_config.NotACausalLM`).
import twotower.hf_config  # noqa: F401, E402

MODEL_NAME = "twotower"
DEFAULT_MAX_LENGTH = 2048


@register_model(MODEL_NAME)
class TwoTowerLM(TemplateLM):
    """An exported two-tower model behind lm-eval's `LM` interface (see the module docstring)."""

    def __init__(self, pretrained: str, mode: str | None = None, gamma: float | None = None,
                 block_size: int | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 model: Any = None, tokenizer: Any = None, **unused: Any) -> None:
        super().__init__()
        import torch
        from transformers import AutoTokenizer

        from twotower import TwoTowerForDiffusionLM
        from twotower.generate import MODES

        if unused:
            warnings.warn(f"twotower: ignoring model_args {sorted(unused)}", stacklevel=2)
        path = Path(str(pretrained))
        self.pretrained = str(pretrained)
        if model is None and not (path / "config.json").exists():
            raise ValueError(f"twotower: pretrained={pretrained} is not an exported two-tower directory "
                             "(no config.json); pass the export stage's `path`")
        defaults = json.loads((path / "generation_config.json").read_text()) \
            if (path / "generation_config.json").exists() else {}
        self.mode = str(mode or defaults.get("mode", "diffusion"))
        if self.mode not in MODES:
            raise ValueError(f"twotower: mode must be one of {MODES}, got {self.mode!r}")
        g = defaults.get("gamma", 0.8) if gamma is None else gamma
        self.gamma = float(g)
        bs = defaults.get("block_size") if block_size is None else block_size
        self.block_size = int(bs) if bs else None
        if str(batch_size).startswith("auto"):
            warnings.warn("twotower: batch_size=auto is not supported; using 1", stacklevel=2)
            batch_size = 1
        self.batch_size_per_call = max(1, int(batch_size))
        self._max_gen_toks = int(max_gen_toks)
        self.model = (model if model is not None else TwoTowerForDiffusionLM.from_pretrained(str(path))).eval()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"twotower: device={device} but CUDA is not available; running on the CPU", stacklevel=2)
        elif device:
            self.model.to(device)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))
        limit = self.model.adapter.max_positions(self.model.context_tower.config)
        self._max_length = int(max_length or limit or DEFAULT_MAX_LENGTH)
        self._torch = torch

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' `config` (`simple_evaluate` calls it): the model name
        and the resolved model args (export path, decoding mode, γ, block size), never None."""
        return {"model": MODEL_NAME, "model_args": {
            "pretrained": self.pretrained, "mode": self.mode, "gamma": self.gamma, "block_size": self.block_size,
            "batch_size": self.batch_size_per_call, "max_length": self._max_length, "max_gen_toks": self._max_gen_toks}}

    # -- lm-eval's TemplateLM contract ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS: what lm-eval's `hf` model puts before an empty context."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As lm-eval's `hf` model: the tokenizer's own special tokens unless told, none twice."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and prefix and string.startswith(prefix):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) through the context tower, and whether greedy."""
        torch = self._torch
        rows = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("twotower: a loglikelihood request with an empty continuation")
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            rows.append((whole[:-1], continuation_enc))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batched together
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = override_bs or self.batch_size
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for start in range(0, len(order), bs):
            batch = order[start:start + bs]
            width = max(len(rows[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for r, i in enumerate(batch):  # right padding: causal, so real positions see no padding
                ids[r, :len(rows[i][0])] = torch.tensor(rows[i][0])
            with torch.inference_mode():
                logits = self.model.context_tower(input_ids=ids.to(self.device)).logits
            logp = torch.log_softmax(logits.double(), dim=-1).cpu()
            for r, i in enumerate(batch):
                inp, cont = rows[i]
                n = len(cont)
                lp = logp[r, len(inp) - n:len(inp)]
                target = torch.tensor(cont)
                total = float(lp.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((lp.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts over lm-eval's disjoint rolling windows of `max_length`."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [(None, *w) for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            out.append(sum(s for s, _ in self._loglikelihood_tokens(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation in `self.mode`, batched per identical `until`/`max_gen_toks`."""
        from stages.evaluation.text_generation import generate_text

        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.pop("do_sample", False) and float(kw.get("temperature", 0.0) or 0.0) > 0:
                warnings.warn("twotower: sampling is not supported; decoding greedily", stacklevel=2)
            parsed.append((context, until, max_gen))
            groups.setdefault((tuple(until), max_gen), []).append(i)
        for (until, max_gen), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = [self.tok_encode(parsed[i][0], left_truncate_len=max(1, self.max_length - max_gen))
                           for i in chunk]
                prompts = [p if p else [self.prefix_token_id] for p in prompts]
                outs = generate_text(self.model, self.tokenizer, prompts, mode=self.mode, max_new_tokens=max_gen,
                                     stops=list(until), gamma=self.gamma, block_size=self.block_size)
                for i, g in zip(chunk, outs):
                    results[i] = g.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """`twotower-lm-eval`: lm-eval's own command line with the `twotower` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

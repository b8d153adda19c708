"""`python -m pipeline completion`: a bash completion script for the `twotower-pipeline` command.

    eval "$(twotower-pipeline completion)"        # in ~/.bashrc

It completes commands, each command's options, recipe names (`recipes/*.yaml`) and the sections of
`key=value` overrides where a recipe goes, and stage names after `--force` / `--from`. The script is
generated from the parser itself, so a new option is completed without touching this module.
"""
from __future__ import annotations

import argparse
import re

import yaml

from pipeline.config import REPO_ROOT

PROGRAM = "twotower-pipeline"


def _words(values) -> str:
    return " ".join(sorted(set(values)))


def section_of(module: str) -> str | None:
    """A stage module's `SECTION`, read from its source (importing every stage would cost seconds)."""
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    found = re.search(r'^SECTION = "(\w+)"', path.read_text(), re.M) if path.is_file() else None
    return found.group(1) if found else None


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The completion function and its `complete` line."""
    from stages import REGISTRY

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    recipes = [p.stem for p in (REPO_ROOT / "recipes").glob("*.yaml")]
    defaults = yaml.safe_load((REPO_ROOT / "pipeline.yaml").read_text()) or {}
    sections = [f"{key}." for key in [*defaults, *(section_of(module) for module in REGISTRY.values())] if key]
    cases = []
    for name, sub in commands.items():
        options = [s for a in sub._actions for s in a.option_strings]
        positional = recipes + sections if any(a.dest == "args" for a in sub._actions) else []
        cases.append(f'    {name}) words="{_words(options + positional)}" ;;')
    return f"""_twotower_pipeline() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" command="" i words
  for ((i = 1; i < COMP_CWORD; i++)); do
    [[ "${{COMP_WORDS[i]}}" != -* ]] && {{ command="${{COMP_WORDS[i]}}"; break; }}
  done
  if [[ "$prev" == "--force" || "$prev" == "--from" ]]; then
    words="{_words(REGISTRY)}"
  elif [[ -z "$command" ]]; then
    words="{_words(list(commands) + ['--help', '--version'])}"
  else
    case "$command" in
{chr(10).join(cases)}
    esac
  fi
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
  [[ ${{#COMPREPLY[@]}} -eq 1 && "${{COMPREPLY[0]}}" == *. ]] && compopt -o nospace 2>/dev/null
}}
complete -o default -F _twotower_pipeline {PROGRAM}
"""


def print_script(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The `completion` command."""
    print(bash_script(parser))
    return 0

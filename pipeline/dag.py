"""The stage DAG: data, built and checked with `graphlib` before any stage runs.

`build_dag(needs)` rejects unknown upstream stages, missing required inputs and cycles, reporting
every problem at once as `(dotted key, message)` pairs the config layer turns into exit-status-2
errors. The resulting `Dag` gives a deterministic topological order (declaration order breaks ties)
and the ancestor/descendant sets that `--force` and `--from` need.
"""
from __future__ import annotations

import graphlib
from dataclasses import dataclass

from pipeline.schema import suggest


class DagError(ValueError):
    """The stage graph is invalid; `problems` lists every `(key, message)` found."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))


@dataclass(frozen=True)
class Dag:
    """A validated stage graph."""

    needs: dict[str, tuple[str, ...]]
    """Each stage's direct upstream stages, in declaration order."""
    order: tuple[str, ...]
    """A topological order: every stage comes after all the stages it needs."""

    def descendants(self, names: set[str] | list[str]) -> set[str]:
        """`names` and every stage that depends on them, directly or not."""
        out = set(names)
        for stage in self.order:  # topological: upstream stages are decided first
            if any(n in out for n in self.needs[stage]):
                out.add(stage)
        return out

    def ancestors(self, name: str) -> set[str]:
        """Every stage `name` depends on, directly or not (not `name` itself)."""
        out: set[str] = set()
        todo = list(self.needs[name])
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.needs[n])
        return out


def dag_problems(needs: dict[str, list[str]], requires: dict[str, tuple[str, ...]] | None = None
                 ) -> list[tuple[str, str]]:
    """Every problem of the graph: unknown upstream stages, missing required inputs, cycles."""
    problems: list[tuple[str, str]] = []
    for stage, ups in needs.items():
        for i, up in enumerate(ups):
            if up == stage:
                problems.append((f"graph.{stage}.needs[{i}]", f"stage '{stage}' needs itself"))
            elif up not in needs:
                problems.append((f"graph.{stage}.needs[{i}]",
                                 f"'{up}' is not a stage of the graph{suggest(up, needs)} "
                                 f"(stages: {', '.join(needs)})"))
    for stage, required in (requires or {}).items():
        for inp in required:
            if stage in needs and inp not in needs[stage]:
                fix = (f"add '{inp}' to graph.{stage}.needs" if inp in needs else
                       f"'{inp}' is not in the graph: put it back (or remove '{stage}')")
                problems.append((f"graph.{stage}.needs", f"stage '{stage}' requires the input '{inp}' "
                                 f"(its REQUIRES), which the graph does not give it: {fix}"))
    if not problems:
        try:
            graphlib.TopologicalSorter(needs).prepare()
        except graphlib.CycleError as err:
            cycle = " -> ".join(err.args[1])
            problems.append((f"graph.{err.args[1][0]}.needs", f"cycle in the stage graph: {cycle}"))
    return problems


def build_dag(needs: dict[str, list[str]], requires: dict[str, tuple[str, ...]] | None = None) -> Dag:
    """Check the graph and return it as a `Dag`; raise `DagError` listing every problem."""
    problems = dag_problems(needs, requires)
    if problems:
        raise DagError(problems)
    rank = {name: i for i, name in enumerate(needs)}
    sorter = graphlib.TopologicalSorter(needs)
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=rank.__getitem__)
        order.extend(ready)
        sorter.done(*ready)
    return Dag(needs={k: tuple(v) for k, v in needs.items()}, order=tuple(order))

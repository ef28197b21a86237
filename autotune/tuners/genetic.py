"""Genetic search: each batch is children of the best configs measured so far.

The population is the `population` cheapest successful configs. A child's parents are tournament winners (the
cheapest of `tournament` members drawn at random); when both parents lie in one branch of the space the child
takes each knob from either parent, otherwise it copies the first; then it mutates, with probability
`mutation_prob`, to a random neighbor (`Space.neighbors`: one knob changed). A child already proposed keeps
walking to random neighbors for a few steps; if it finds nothing new the slot gets a random config, so the
search never repeats a config and still finishes a small space. Until two configs have succeeded, batches are
random.
"""

from __future__ import annotations

from kiln.schedules.space import Config

from .base import Tuner


class GATuner(Tuner):
    def __init__(
        self,
        *args,
        population: int = 32,
        tournament: int = 3,
        mutation_prob: float = 0.2,
        walk_steps: int = 8,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.population, self.tournament = population, tournament
        self.mutation_prob, self.walk_steps = mutation_prob, walk_steps

    def _propose(self, n: int) -> list[int]:
        ok = sorted(self._successes(), key=lambda ic: ic[1])[: self.population]
        if len(ok) < 2:
            return self._random_unproposed(n)
        pop = [(self.space.at(i), c) for i, c in ok]
        out: list[int] = []
        taken: set[int] = set()
        for _ in range(n):
            child = self._mutate(self._crossover(self._select(pop), self._select(pop)))
            i = self.space.index(child)
            for _ in range(self.walk_steps):
                if i not in self._proposed and i not in taken:
                    break
                child = self._neighbor(child)
                i = self.space.index(child)
            if i in self._proposed or i in taken:
                fresh = self._random_unproposed(1, taken)
                if not fresh:
                    break
                i = fresh[0]
            taken.add(i)
            out.append(i)
        return out

    def _select(self, pop: list[tuple[Config, float]]) -> Config:
        return min(self.rng.sample(pop, min(self.tournament, len(pop))), key=lambda cc: cc[1])[0]

    def _crossover(self, a: Config, b: Config) -> Config:
        if set(a) != set(b):
            return dict(a)
        child = {k: (a[k] if self.rng.random() < 0.5 else b[k]) for k in a}
        return child if child in self.space else dict(a)  # two branches with the same knob names

    def _mutate(self, cfg: Config) -> Config:
        return self._neighbor(cfg) if self.rng.random() < self.mutation_prob else cfg

    def _neighbor(self, cfg: Config) -> Config:
        near = self.space.neighbors(cfg)
        return near[self.rng.randrange(len(near))] if near else cfg

"""Config spaces: a cartesian product of launch parameters, pruned by constraints.

A kernel package declares its space once (``RMSNORM_ROPE_CONFIGS = ConfigSpace(...)``); the tuner and
``select_config`` only ever see the plain dicts it yields.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from triton_ops_core.exceptions import InvalidArgumentError
from triton_ops_core.launch import next_pow2

Config = dict[str, Any]
Problem = Mapping[str, int]
Constraint = Callable[[Config, "Problem | None"], bool]


class ConfigSpace:
    """The launch configs a kernel may use: every combination of ``params``, minus the pruned ones.

    ``params`` maps a parameter name (``BLOCK_SIZE``, ``num_warps``, ...) to its candidate values.
    Each constraint is called as ``constraint(config, problem)`` and returns False to drop the
    config; ``problem`` is the problem-size dict, or None when the space is listed without one
    (constraints must then judge the config alone, or keep it).
    """

    def __init__(self, params: Mapping[str, Sequence[Any]], constraints: Iterable[Constraint] = ()) -> None:
        if not isinstance(params, Mapping) or not params:
            raise InvalidArgumentError(f"params: expected a non-empty mapping of name -> values, got {params!r}")
        for name, values in params.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"params: parameter names must be non-empty strings, got {name!r}")
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise InvalidArgumentError(f"params[{name!r}]: expected a sequence of values, got {values!r}")
            if len(list(values)) == 0:
                raise InvalidArgumentError(f"params[{name!r}]: expected at least one value")
        self.params: dict[str, tuple[Any, ...]] = {name: tuple(values) for name, values in params.items()}
        self.constraints: tuple[Constraint, ...] = tuple(constraints)
        for c in self.constraints:
            if not callable(c):
                raise InvalidArgumentError(f"constraints: expected callables (config, problem) -> bool, got {c!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter names, in declaration order (the keys of every config)."""
        return tuple(self.params)

    def _product(self) -> Iterator[Config]:
        names = self.names
        for values in itertools.product(*self.params.values()):
            yield dict(zip(names, values))

    def allows(self, config: Mapping[str, Any], problem: Problem | None = None) -> bool:
        """Whether ``config`` has exactly this space's parameters and passes every constraint.

        Values outside the declared lists are allowed: a cached config stays usable after the
        space is narrowed, as long as the constraints (the real limits) still accept it.
        """
        if set(config) != set(self.params):
            return False
        cfg = dict(config)
        return all(c(cfg, problem) for c in self.constraints)

    def configs(self, problem: Problem | None = None) -> list[Config]:
        """The pruned cartesian product, as fresh plain dicts, in declaration order."""
        return [cfg for cfg in self._product() if all(c(cfg, problem) for c in self.constraints)]

    def size(self) -> int:
        """The size of the unpruned product."""
        n = 1
        for values in self.params.values():
            n *= len(values)
        return n

    def with_constraints(self, *constraints: Constraint) -> ConfigSpace:
        """A copy of this space with more constraints."""
        return ConfigSpace(self.params, (*self.constraints, *constraints))

    def __iter__(self) -> Iterator[Config]:
        return iter(self.configs())

    def __len__(self) -> int:
        return len(self.configs())

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={list(v)}" for k, v in self.params.items())
        return f"ConfigSpace({params}; {len(self.constraints)} constraints)"


# Constraint builders for the limits every kernel meets. Each returns a (config, problem) -> bool.


def block_fits(param: str, dim: str, *, at_least: int = 1) -> Constraint:
    """Drop configs whose ``param`` exceeds the next power of two of ``problem[dim]``.

    A block larger than the padded dimension only adds masked-off lanes. ``at_least`` keeps
    blocks up to that size anyway (Triton needs a minimum tile for ``tl.dot``, for example).
    Without a problem (or without ``dim`` in it) every config passes.
    """

    def check(cfg: Config, problem: Problem | None) -> bool:
        if problem is None or dim not in problem:
            return True
        return cfg[param] <= max(at_least, next_pow2(problem[dim]))

    check.__name__ = f"block_fits({param}<={dim})"
    return check


def shared_memory_fits(estimate: Callable[[Config, Problem | None], int], limit_bytes: int = 227 * 1024) -> Constraint:
    """Drop configs whose estimated shared memory (``estimate(config, problem)`` bytes) exceeds the limit.

    The default limit is an H100's 227 KiB per block; configs over it fail to launch
    ("out of resource: shared memory"), so pruning them saves a compile each.
    """

    def check(cfg: Config, problem: Problem | None) -> bool:
        return estimate(cfg, problem) <= limit_bytes

    check.__name__ = "shared_memory_fits"
    return check


def elements_per_thread_at_most(block_params: Sequence[str], limit: int, *,
                                warps_param: str = "num_warps") -> Constraint:
    """Drop configs whose tile, spread over the block's threads, exceeds ``limit`` elements per thread.

    A stand-in for the register limit: past a few hundred fp32 values per thread the kernel spills.
    The tile is the product of ``block_params``; the block has ``32 * config[warps_param]`` threads.
    """

    def check(cfg: Config, problem: Problem | None) -> bool:
        tile = 1
        for p in block_params:
            tile *= cfg[p]
        return tile <= limit * 32 * cfg.get(warps_param, 4)

    check.__name__ = f"elements_per_thread_at_most({limit})"
    return check


def threads_at_most_block(block_param: str, *, warps_param: str = "num_warps") -> Constraint:
    """Drop configs with more threads than elements in a 1-D block (idle warps only cost occupancy)."""

    def check(cfg: Config, problem: Problem | None) -> bool:
        return 32 * cfg.get(warps_param, 4) <= max(32, cfg[block_param])

    check.__name__ = f"threads_at_most_block({block_param})"
    return check


__all__ = [
    "Config",
    "ConfigSpace",
    "Constraint",
    "block_fits",
    "elements_per_thread_at_most",
    "shared_memory_fits",
    "threads_at_most_block",
]

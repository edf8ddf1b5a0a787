"""The torch engine's 2-D device mesh (data × context) and each rank's slice of the rows (``engine.cp``).

``engine.cp = N`` arranges the ``W`` processes as ``W/N`` data-parallel groups of ``N`` context-parallel
ranks (``init_device_mesh(..., (W/N, N), ("dp", "cp"))``; a CP group is ``N`` consecutive ranks, so
it stays inside a node when ``N`` divides the GPUs per node). What each dimension does:

* **data** (``dp``): which rows a rank reads (:func:`~.batches.rank_positions` and the validation
  split take the data-parallel rank and size). The ``N`` ranks of a CP group read the same rows
  and draw the same noise (seeded per sample), each keeps its slice of positions
  (:class:`~nemodiff_train.core.context_split.RowSplit`);
* **context** (``cp``): attention gathers keys and values over the CP group
  (:mod:`nemodiff_train.models.context_parallel`).

Every rank holds the full parameters and computes the gradient of its own positions' share of the
global per-token mean, so parameter gradients are SUMS over data and context ranks alike: DDP
all-reduces and FSDP2 shards and reduce-scatters over all ``W`` ranks, the flattened ``dp × cp`` mesh
(torchtitan's ``dp_shard_cp``). The loss scale is therefore unchanged: each rank backpropagates its
local numerator × W / the global denominator, and the wrapper's average over W gives the sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...config.errors import ConfigError
from ...core.context_split import RowSplit
from ...models.context_parallel import ContextShard
from .distributed import DistEnv

__all__ = ["ParallelDims", "parallel_dims"]


@dataclass
class ParallelDims:
    """This rank's place in the data × context mesh.

    Attributes:
        dp, cp: data-parallel and context-parallel sizes (``dp · cp`` = world size).
        dp_rank, cp_rank: this rank's coordinates.
        cp_group: the process group of this rank's CP group (None when ``cp == 1``).
        device: where the shards' index tensors live.
    """

    dp: int
    cp: int
    dp_rank: int
    cp_rank: int
    cp_group: object = None
    device: torch.device = torch.device("cpu")
    _shards: dict = field(default_factory=dict, repr=False)

    def shard(self, seq_len: int) -> ContextShard | None:
        """This rank's :class:`ContextShard` of rows of ``seq_len`` tokens per stream (None when ``cp == 1``)."""
        if self.cp == 1:
            return None
        if seq_len not in self._shards:
            try:
                split = RowSplit(seq_len, self.cp, self.cp_rank)
            except ValueError as err:
                raise ConfigError(f"engine.cp={self.cp}: {err}") from None
            self._shards[seq_len] = ContextShard.build(split, self.cp_group, self.device)
        return self._shards[seq_len]

    def on_shard(self, mb):
        """``mb`` (a :class:`~nemodiff_train.models.step.MicroBatch` of whole rows, on the CPU) as this rank sees it."""
        shard = self.shard(mb.x0.shape[1])
        return mb if shard is None else mb.sharded(shard)


def parallel_dims(env: DistEnv, cp: int) -> ParallelDims:
    """The mesh of ``env``'s processes for ``engine.cp = cp``.

    Raises:
        ConfigError: the world size is not a multiple of ``cp``.
    """
    if cp == 1:
        return ParallelDims(env.world_size, 1, env.rank, 0, None, env.device)
    if env.world_size % cp:
        raise ConfigError(f"engine.cp={cp}: the world size {env.world_size} is not a multiple of it (the processes "
                          "form world/cp data-parallel groups of cp context-parallel ranks)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size // cp, cp), mesh_dim_names=("dp", "cp"))
    return ParallelDims(env.world_size // cp, cp, mesh.get_local_rank("dp"), mesh.get_local_rank("cp"),
                        mesh.get_group("cp"), env.device)

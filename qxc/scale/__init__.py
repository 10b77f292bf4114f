"""Scale-out: the heavy loops (calibration, permutation importance, Shapley values, surrogate labelling, compare)
over chunks of data, locally or on Ray.

Data is split into fixed-size row chunks (or given as a folder of shards that workers read themselves). Each chunk
yields statistics that merge exactly — min/max, fixed-range histogram counts, sums — and chunks are merged in chunk
order, so the local backend and Ray give the same numbers. Ray is an optional extra (``pip install qxc[ray]``).
"""

from qxc.scale.backends import LocalBackend, RayBackend, make_backend
from qxc.scale.chunks import Chunk, chunks_of
from qxc.scale.tasks import (
    distributed_compare,
    distributed_description,
    distributed_labels,
    distributed_permutation,
    distributed_ranges,
    distributed_shapley,
)

__all__ = ["Chunk", "LocalBackend", "RayBackend", "chunks_of", "distributed_compare", "distributed_description",
           "distributed_labels", "distributed_permutation", "distributed_ranges", "distributed_shapley", "make_backend"]

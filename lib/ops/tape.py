"""Replaying the FPS and kNN of a fixed batch (HAQ's search subset) without recomputing them."""


class GeometryTape:
    """The FPS and kNN results of one forward pass over a fixed batch, replayed by later passes.

    A network's geometry depends on the clouds only, never on its weights, and HAQ scores
    hundreds of weight settings on one fixed subset: each batch of it needs its FPS and kNN once.
    Inside `with tape:` the first pass records every farthest_point_sample / knn_query result in
    call order; later passes get them back in that order, with no computation and no host-device
    copy. Each replayed call must match its recording (operation, m or k, input shapes, dtypes
    and devices), so a tape replayed through another network raises instead of returning wrong
    neighbours; the clouds are not compared, so keep one tape per batch.
    """

    def __init__(self):
        self.entries = []  # [(call signature, result)] in call order
        self.recorded = False
        self._position = None

    def __enter__(self):
        global _TAPE
        if _TAPE is not None:
            raise RuntimeError("lib/ops/tape.py: geometry tapes do not nest")
        _TAPE, self._position = self, 0
        return self

    def __exit__(self, exc_type, exc, traceback):
        global _TAPE
        _TAPE = None
        if exc_type is not None:
            if not self.recorded:  # an interrupted recording is incomplete
                self.entries = []
            return
        if self.recorded and self._position != len(self.entries):
            raise ValueError(f"lib/ops/tape.py: geometry tape replayed {self._position} of its "
                             f"{len(self.entries)} calls")
        self.recorded = True

    def run(self, signature, compute):
        if not self.recorded:
            self.entries.append((signature, compute()))
            return self.entries[-1][1]
        if self._position >= len(self.entries) or self.entries[self._position][0] != signature:
            raise ValueError(f"lib/ops/tape.py: geometry tape replay diverged at call "
                             f"{self._position}: {signature}")
        self._position += 1
        return self.entries[self._position - 1][1]


_TAPE = None  # the GeometryTape of the enclosing `with`, if any


def taped(name, number, tensors, compute):
    """compute(), or its recording on the enclosing tape."""
    if _TAPE is None:
        return compute()
    signature = (name, number) + tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
    return _TAPE.run(signature, compute)

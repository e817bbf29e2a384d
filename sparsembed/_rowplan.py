"""The row plan of a batch, shared by the CPU and GPU backends."""


class RowPlan:
    """A batch's ids sorted once (stably) and reused by renorm, counts and backward.

    Attributes
    ----------
    perm : ndarray of shape (m,), int64
        Positions in the flat batch, grouped by id, input order within each id;
        entries equal to the skipped row (padding) are left out.
    rows : ndarray of shape (n_rows,), int64
        Sorted distinct ids (the skipped row excluded).
    starts : ndarray of shape (n_rows + 1,), int64
        ``perm[starts[u]:starts[u + 1]]`` are the positions of ``rows[u]``.
    skipped : bool
        Whether the skipped row occurred in the batch.
    n : int
        Length of the flat batch.

    The arrays belong to the backend that built the plan (numpy on the CPU, CuPy
    on the GPU).
    """

    __slots__ = ("perm", "rows", "starts", "skipped", "n")

    def __init__(self, perm, rows, starts, skipped, n):
        self.perm, self.rows, self.starts, self.skipped, self.n = perm, rows, starts, skipped, n

    @property
    def counts(self):
        """Occurrences of each of ``rows`` (an array of the plan's array module)."""
        return self.starts[1:] - self.starts[:-1]

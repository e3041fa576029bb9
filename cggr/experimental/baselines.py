"""Reference signals that lost in every measured regime (BENCHMARKS.md), kept runnable: a running per-key
baseline of the router's row NLL, and Otsu's threshold of a reference NLL."""
import torch
from torch import nn

from ..reference import _row_values


class RunningBaseline(nn.Module):
    """Running mean of the router's row NLL per key, as a reference NLL (see the module docstring).

    ``values[key]`` starts unset; ``update(keys, row_nll)`` sets a key's first value to the batch mean of
    its rows, then moves it by ``momentum`` (``new = momentum * old + (1 - momentum) * batch mean``).
    ``reference_nll(keys, seq_len)`` returns ``[B, seq_len - 1]`` (every token of a row gets its key's
    value; keys not seen yet get the mean over the keys seen, or 0 before any update, so they rank by
    their own loss). State (``values``, ``seen``) is in buffers: ``state_dict`` saves it. Everything
    stays on the buffers' device; no host synchronisation.
    """

    def __init__(self, num_keys: int, momentum: float = 0.9, device=None):
        super().__init__()
        if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
            raise ValueError(f"num_keys must be an int >= 1, got {num_keys!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("values", torch.zeros(num_keys, dtype=torch.float32, device=device))
        self.register_buffer("seen", torch.zeros(num_keys, dtype=torch.bool, device=device))

    def _keys(self, keys: torch.Tensor, name: str = "keys") -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1 or keys.is_floating_point() or keys.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor of keys, got "
                             f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
        if keys.device != self.values.device:
            raise ValueError(f"{name}: on {keys.device}, the baseline is on {self.values.device}")
        return keys.long()

    @torch.no_grad()
    def reference_nll(self, keys: torch.Tensor, seq_len: int) -> torch.Tensor:
        keys = self._keys(keys)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (the rows' length, T), got {seq_len!r}")
        seen = self.seen.to(torch.float32)
        fill = (self.values * seen).sum() / seen.sum().clamp_min(1.0)
        keys = self._in_range(keys)
        row = torch.where(self.seen[keys], self.values[keys], fill)
        return row[:, None].expand(len(keys), seq_len - 1)

    def _in_range(self, keys: torch.Tensor) -> torch.Tensor:
        # A key outside [0, num_keys) fails a device assert (no host sync); the clamp keeps the reads that
        # were already queued in bounds.
        torch._assert_async(((keys >= 0) & (keys < len(self.values))).all(),
                            "RunningBaseline: a key is outside [0, num_keys)")
        return keys.clamp(0, len(self.values) - 1)

    @torch.no_grad()
    def update(self, keys: torch.Tensor, row_nll: torch.Tensor):
        keys = self._keys(keys)
        if not isinstance(row_nll, torch.Tensor) or tuple(row_nll.shape) != tuple(keys.shape):
            raise ValueError(f"row_nll: expected shape {tuple(keys.shape)} (one value per key), got "
                             f"{tuple(row_nll.shape) if isinstance(row_nll, torch.Tensor) else type(row_nll).__name__}")
        keys = self._in_range(keys)
        row_nll = row_nll.detach().to(torch.float32)
        finite = torch.isfinite(row_nll)  # rows with nothing scored (-inf / nan) teach the baseline nothing
        sums = torch.zeros_like(self.values).index_add_(0, keys, torch.where(finite, row_nll, torch.zeros_like(row_nll)))
        counts = torch.zeros_like(self.values).index_add_(0, keys, finite.to(torch.float32))
        hit = counts > 0
        batch_mean = sums / counts.clamp_min(1.0)
        moved = torch.where(self.seen, self.momentum * self.values + (1.0 - self.momentum) * batch_mean, batch_mean)
        self.values.copy_(torch.where(hit, moved, self.values))
        self.seen.logical_or_(hit)


def otsu_threshold(row_nll) -> float:
    """A split of rows into two groups by their reference NLL alone, without labels or held-out data:
    Otsu's threshold (the cut that maximises the between-group variance; Otsu, 1979).

    It finds the reference's domain only when that domain is the low group of a two-group mix (BENCHMARKS.md,
    regime 3, has a case where it is not); prefer ``cggr.reference.domain_threshold``. ``row_nll``: 1-D,
    finite, at least 2 distinct values. Returns the midpoint between the two values the cut falls between.
    """
    values = _row_values(row_nll, "row_nll")
    x = torch.sort(values).values
    n = len(x)
    if n < 2 or bool(x[0] == x[-1]):
        raise ValueError(f"row_nll: need at least 2 distinct values to split, got {n} value(s)"
                         + ("" if n < 2 else f", all {float(x[0])}"))
    # Split after position i (i = 1 .. n-1): w0 = i/n, w1 = 1 - w0, between-class variance w0 w1 (m0 - m1)^2.
    csum = torch.cumsum(x, 0)
    i = torch.arange(1, n, dtype=torch.float64)
    m0 = csum[:-1] / i
    m1 = (csum[-1] - csum[:-1]) / (n - i)
    between = (i / n) * (1 - i / n) * (m0 - m1) ** 2
    between = torch.where(x[1:] > x[:-1], between, torch.full_like(between, -1.0))  # no cut between equal values
    cut = int(torch.argmax(between))
    return float((x[cut] + x[cut + 1]) / 2)

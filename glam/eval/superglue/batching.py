"""Cutting variable-length evaluation rows into model calls that are cheap on a CPU and compile few
shapes.

Why not "batch_size rows padded to max_length": on XLA:CPU a decoder of this size is compute-bound
already at one row of a few hundred tokens, so a larger batch buys little, while every padded token
costs as much as a real one and a [rows, heads, width, width] float32 attention tensor of tens of
MB falls out of cache (measured: [32, 512] rows cost 45 ms each, [2, 512] 34 ms). So rows are
sorted by length, a call holds at most `max_batch_tokens` tokens, and each call is padded to the
smallest of a few widths (powers of two and 1.5x powers of two: at most a third of a row is
padding) and to a power-of-two row count, which keeps the number of compiled shapes small.
"""


def bucket_length(length: int, cap: int | None = None, minimum: int = 16) -> int:
  """The smallest of minimum x {1, 1.5, 2, 3, 4, 6, 8, ...} holding `length`, at most `cap`."""
  power = max(minimum, 1)
  while True:
    for width in (power, power * 3 // 2):
      if length <= width:
        return width if cap is None else min(width, cap)
    power *= 2


def padded_rows(rows: int, batch_size: int) -> int:
  """Rows of a call holding `rows` real ones: the next power of two, at most batch_size."""
  return min(1 << max(rows - 1, 0).bit_length(), max(batch_size, rows))


def plan_calls(costs: list[int], *, batch_size: int, max_batch_tokens: int) -> list[list[int]]:
  """Item indices, cheapest first, cut into calls of at most `batch_size` items whose count times
  the costliest item's cost (tokens) stays within `max_batch_tokens`, the count rounded down to a
  power of two (calls are padded to one: see padded_rows); an item costlier than the budget gets
  a call of its own."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be 1 or more")
  if max_batch_tokens < 1:
    raise ValueError(f"max_batch_tokens={max_batch_tokens}: must be 1 or more")
  calls: list[list[int]] = []
  current: list[int] = []
  for i in sorted(range(len(costs)), key=lambda i: costs[i]):
    fits = max(int(max_batch_tokens) // max(int(costs[i]), 1), 1)
    if current and len(current) + 1 > min(batch_size, 1 << (fits.bit_length() - 1)):
      calls.append(current)
      current = []
    current.append(i)
  if current:
    calls.append(current)
  return calls
